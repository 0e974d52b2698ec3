"""Optimiser and learning-rate schedule of a recipe's `train:` section.

Weight decay goes to weight matrices only: parameters named `weight`, `w1` or `w2` with two or more
dimensions (Linear, patch-embedding conv, router and stacked expert kernels). Biases (expert biases
`b1`/`b2` are 3-D but still biases), LayerNorm scales, the position embedding and the CLS token
never decay. `freeze` switches off the gradients of a recipe's `train.freeze` prefixes first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vmoe_cli.config import TrainConfig
from vmoe_cli.errors import VmoeError

DECAYED = ("weight", "w1", "w2")


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Hold the parameters under each dotted-name prefix fixed; a prefix that names nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        hits = [name for name in names if name == prefix or name.startswith(prefix + ".")]
        if not hits:
            tops = ", ".join(dict.fromkeys(name.split(".")[0] for name in names))
            raise VmoeError(f"train.freeze: {prefix!r} names no parameter (top-level names: {tops})")
        for name in hits:
            model.get_parameter(name).requires_grad_(False)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or SGD with momentum, with the two parameter groups above."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and name.rsplit(".", 1)[-1] in DECAYED else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # the fused kernel updates each tensor in one pass (CPU and CUDA); FSDP2's
    # sharded DTensor parameters keep the default per-tensor path
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=not cfg.fsdp)


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    """The recipe's warmup, capped at half of the run's `total` steps.

    A run shortened for a quick try (`--set train.steps=150` on a recipe warming up for 200) still reaches
    the peak learning rate and decays; every shipped recipe warms up for less than half its run.
    """
    return min(cfg.warmup_steps, total // 2)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based) as a fraction of the peak: linear warmup, then the decay."""
    warmup = warmup_steps(total, cfg)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "rsqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1 - progress
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step over `total` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
