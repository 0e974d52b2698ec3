"""What training minimises besides the routers' auxiliary losses: the task loss on soft targets, and the
super-class guidance of a per-image router (Mobile V-MoE), both computed here next to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.vit import ModelOutput


def task_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax cross-entropy, or sigmoid BCE summed over classes (big_vision), both on soft targets."""
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    return F.cross_entropy(logits, targets)


class SuperclassGuidance:
    """`weight x cross_entropy(image router logits, super-class of the label)`: teaches a per-image router to
    send each image to the expert of its class's group (Mobile V-MoE, Daxberger et al. 2023)."""

    def __init__(self, moe: MoEConfig, device: torch.device | str):
        self.weight = moe.superclass_weight
        self.superclass_of = torch.tensor(moe.superclasses, device=device)  # class -> super-class (expert)

    def loss(self, out: ModelOutput, labels_B: torch.Tensor) -> torch.Tensor:
        """The unweighted guidance cross-entropy of one batch."""
        return F.cross_entropy(out.image_logits_BE, self.superclass_of[labels_B])

    def weighted(self, out: ModelOutput, labels_B: torch.Tensor) -> torch.Tensor:
        """What the guidance adds to the training loss."""
        return self.weight * self.loss(out, labels_B)

    @torch.no_grad()
    def metrics(self, out: ModelOutput, labels_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guidance loss and how often the router's top-1 expert is the image's super-class, for the log."""
        target_B = self.superclass_of[labels_B]
        top1 = (out.image_logits_BE.argmax(-1) == target_B).float().mean()
        return {"superclass_loss": self.loss(out, labels_B), "superclass_top1": top1}


def superclass_guidance(moe: MoEConfig | None, device: torch.device | str) -> SuperclassGuidance | None:
    """The guidance of a recipe whose per-image router is given super-classes; None otherwise."""
    return None if moe is None or moe.superclasses is None else SuperclassGuidance(moe, device)
