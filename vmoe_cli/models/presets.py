"""Model sizes as one table, parsed from variant strings like "B/16" (big_vision style).

ViT sizes follow the ViT paper (Ti/S/B/L/H); `vmoe-S` is the V-MoE paper's small model
(8 blocks, width 512), which differs from ViT-S. `nano` and `micro` are ours: they train
in minutes on a laptop CPU (nano for 8x8 digits, micro for 28x28 Fashion-MNIST).
"""

from __future__ import annotations

from typing import NamedTuple

from vmoe_cli.errors import VmoeError


class Size(NamedTuple):
    depth: int  # encoder blocks
    width: int  # token width D
    mlp_dim: int  # MLP hidden size H (dense and every expert)
    heads: int  # attention heads


SIZES: dict[str, Size] = {
    "nano": Size(4, 64, 128, 4),
    "micro": Size(6, 128, 256, 4),
    "Ti": Size(12, 192, 768, 3),
    "S": Size(12, 384, 1536, 6),
    "vmoe-S": Size(8, 512, 2048, 8),
    "B": Size(12, 768, 3072, 12),
    "L": Size(24, 1024, 4096, 16),
    "H": Size(32, 1280, 5120, 16),
}


def parse_variant(variant: str) -> tuple[Size, int]:
    """Parse "B/16" into (Size of B, patch 16); raises VmoeError naming the valid sizes."""
    name, _, patch = variant.partition("/")
    if name not in SIZES or not patch.isdigit() or int(patch) < 1:
        raise VmoeError(
            f"model.variant={variant!r}: expected SIZE/PATCH with SIZE one of {', '.join(SIZES)} (e.g. 'B/16')"
        )
    return SIZES[name], int(patch)
