"""Analytic FLOPs and parameter counts of a ViT / V-MoE, and the model card built from them.

FLOPs count the matrix multiplications only (2 per multiply-add), as
`torch.utils.flop_counter.FlopCounterMode` does, so the two can be checked against each
other. An MoE block counts the expert slots it computes (E x C per group, filled or not),
not the tokens it routes: that is what the hardware pays. Run dropless, it computes exactly
K expert MLPs per token. FLOPs are those of inference (`MoEConfig.dropless_at(training=False)`).
"""

from __future__ import annotations

import torch

from vmoe_cli.models.config import ModelConfig, conv_stem_channels, conv_stem_sides
from vmoe_cli.models.routing import group_capacity
from vmoe_cli.models.vit import VisionTransformer


def moe_capacity(cfg: ModelConfig, batch: int | None = None) -> int:
    """C per expert per group for the groups a batch of `batch` images is cut into (default: the recipe's)."""
    return group_capacity(cfg.moe, cfg.moe.group_tokens(batch, cfg.tokens_per_image))


def flops_per_image(cfg: ModelConfig, batch: int | None = None) -> float:
    """Matmul FLOPs of one forward pass per image, in a batch of `batch` images (for its routing groups).

    A fraction where a group's E*C slots do not split evenly over its images.
    """
    depth, D, H, _, patch = cfg.sizes()
    N = cfg.tokens_per_image
    total = stem_flops(cfg)
    attention = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D  # qkv, scores and values, out
    moe_layers = set(cfg.moe_layers())
    for i in range(depth):
        total += attention
        total += moe_flops(cfg, batch) if i in moe_layers else 2 * 2 * N * D * H
    if cfg.moe is not None and cfg.moe.kind.per_image:
        total += 2 * D * cfg.moe.num_experts  # the image router, once per image on its mean token
    rep = cfg.representation_size
    if rep:
        total += 2 * D * rep
    if cfg.num_classes:
        total += 2 * (rep or D) * cfg.num_classes
    return total


def moe_flops(cfg: ModelConfig, batch: int | None = None) -> float:
    """Matmul FLOPs per image of one MoE MLP: its router and its experts over every slot, filled or not."""
    _, D, H, _, _ = cfg.sizes()
    N, moe = cfg.tokens_per_image, cfg.moe
    if not moe.kind.has_plan:  # Soft MoE: one image per group, E x slots mixtures
        slots = moe.num_experts * moe.soft_slots(N)
        return 3 * 2 * N * slots * D + slots * 2 * 2 * D * H  # logits, dispatch and combine mixtures; experts
    if moe.dropless_at(training=False):
        slots_per_image = N * moe.k  # every choice, nothing else
    else:
        images = moe.group_tokens(batch, N) / N  # a fraction when groups straddle images
        slots_per_image = moe.num_experts * moe_capacity(cfg, batch) / images
    router = 0 if moe.kind.per_image else 2 * N * D * moe.num_experts  # per image: counted once per model
    return router + slots_per_image * 2 * 2 * D * H  # combine is elementwise


def stem_flops(cfg: ModelConfig) -> float:
    """Matmul FLOPs per image of turning pixels into tokens: the patch conv, or each conv of the conv stem."""
    _, D, _, _, patch = cfg.sizes()
    grid = cfg.image_size // patch
    if cfg.stem == "patch":
        return 2 * grid * grid * (patch * patch * cfg.channels) * D
    total, channels = 0, cfg.channels
    for out, side in zip(conv_stem_channels(D, patch), conv_stem_sides(cfg.image_size, patch), strict=True):
        total += 2 * side * side * (3 * 3 * channels) * out
        channels = out
    return total + 2 * grid * grid * channels * D  # the 1x1 conv to D


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters a token uses): experts it is not routed to do not count.

    The model is built on the meta device, so an H/14 with 32 experts costs no memory.
    """
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    if cfg.moe is None:
        return total, total
    unused = 0
    for i in cfg.moe_layers():
        experts = model.blocks[i].mlp.experts
        per_expert = sum(p[0].numel() for p in experts.parameters())
        unused += (cfg.moe.num_experts - cfg.moe.k) * per_expert
    return total, total - unused


def model_card(cfg: ModelConfig) -> dict[str, object]:
    """What `vmoe model-info` prints: sizes, parameters, FLOPs and the MoE settings."""
    depth, width, mlp_dim, heads, patch = cfg.sizes()
    total, active = parameter_counts(cfg)
    card: dict[str, object] = {
        "variant": cfg.variant,
        "blocks x width x MLP x heads": f"{depth} x {width} x {mlp_dim} x {heads}",
        "image / patch / tokens per image": f"{cfg.image_size} / {patch} / {cfg.tokens_per_image}",
        "stem": "patchify conv" if cfg.stem == "patch" else f"conv stem {conv_stem_channels(width, patch)} + 1x1",
        "pooling / representation": f"{cfg.pool} / {cfg.representation_size or 'none'}",
        "classes": cfg.num_classes,
        "total parameters": total,
        "parameters active per token": active,
        "GFLOPs per image": flops_per_image(cfg) / 1e9,
    }
    moe = cfg.moe
    if moe is None:
        card["MoE blocks"] = "none (dense ViT)"
        return card
    card["MoE blocks"] = ", ".join(map(str, cfg.moe_layers())) + f" (of 0..{depth - 1})"
    card["router"] = moe.router
    card["capacity"] = f"fixed {moe.capacity}" if moe.capacity else f"factor {moe.capacity_factor}"
    if not moe.kind.has_plan:
        card["experts E / slots per expert (per image)"] = f"{moe.num_experts} / {moe.soft_slots(cfg.tokens_per_image)}"
        return card
    card["experts E / selected K"] = f"{moe.num_experts} / {moe.k}" if moe.kind.choice == "token" else moe.num_experts
    modes = ["dropless" if moe.dropless_at(training) else "capacity" for training in (True, False)]
    card["execution: training / inference"] = " / ".join(modes)
    if "capacity" in modes:
        card["capacity per expert per group C"] = moe_capacity(cfg)
    group = moe.group_tokens(None, cfg.tokens_per_image)
    card["group size"] = f"{group} tokens = {group / cfg.tokens_per_image:g} images"
    card["dispatch"] = "bfloat16" if moe.bfloat16_dispatch else "model precision"
    card["batch priority routing"] = "on" if moe.bpr else "off"
    return card
