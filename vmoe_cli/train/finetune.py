"""Fine-tuning: a pre-trained checkpoint's weights in the recipe's model, a new head, then the shared loop.

What may differ from the checkpoint's model (the V-MoE papers' fine-tuning practice): the number of classes and the head
(always new: zero weights, bias -log(classes)), the image resolution (the position-embedding grid is resized
bilinearly, the CLS row kept), routing settings (K, capacity, groups, BPR: recipe values, expert weights from
the checkpoint) and the training section. Anything else that changes a tensor's shape or name (width, depth,
patch size, number of experts, MoE blocks) is a one-line VmoeError naming the tensor. Checkpoint tensors the
recipe's model does not have (a dropped representation layer) are ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vmoe_cli.checkpoint import load_recipe_of, load_weights, resolve_checkpoint
from vmoe_cli.config import Recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import VisionTransformer, resize_pos_embed
from vmoe_cli.train.loop import train


def finetune(recipe: Recipe, source: str | Path, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Fine-tune the weights of checkpoint `source` with `recipe` into run directory `out_dir`; the final eval.

    On resume the run's own checkpoint restores everything and `source` is not read.
    """
    model = None if resume else initial_model(recipe, source)
    return train(recipe, Path(out_dir), resume, model=model)


@torch.no_grad()
def initial_model(recipe: Recipe, source: str | Path) -> VisionTransformer:
    """The recipe's model holding `source`'s weights, pos_embed resized, with a new head: the step-0 model."""
    ckpt = resolve_checkpoint(source, "--from")
    weights, old = load_weights(ckpt), load_recipe_of(ckpt).model
    model = VisionTransformer(recipe.model)
    if old.pool != recipe.model.pool:
        raise VmoeError(f"{ckpt}: pooled by {old.pool!r}, the recipe by {recipe.model.pool!r}; keep model.pool")
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            continue
        if name not in weights:
            raise VmoeError(f"{ckpt}: has no tensor {name} (the recipe's model differs beyond head and resolution)")
        value = weights[name]
        if name == "pos_embed" and value.shape[-1] == tensor.shape[-1] and value.shape != tensor.shape:
            grid = recipe.model.image_size // recipe.model.sizes()[4]
            value = resize_pos_embed(value, grid, has_cls=old.pool == "cls")
        if value.shape != tensor.shape:
            raise VmoeError(
                f"{ckpt}: tensor {name} is {tuple(value.shape)} there but {tuple(tensor.shape)} in the recipe's "
                "model (fine-tuning may change only the head, resolution and routing settings)"
            )
        tensor.copy_(value)
    if model.head is not None:
        model.head.weight.zero_()
        model.head.bias.fill_(-math.log(recipe.model.num_classes))
    return model
