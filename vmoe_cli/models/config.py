"""What a model is, as data: the dataclasses a recipe's `model:` section fills.

Every field has a default and a comment; `vmoe_cli.config` turns YAML into these
and rejects unknown keys, so the field names here are the recipe's vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vmoe_cli.errors import VmoeError
from vmoe_cli.models.presets import parse_variant


@dataclass(frozen=True)
class RouterKind:
    """What a kind of router is, as the facts the rest of the code reads (the one place a kind is described).

    The router classes themselves are listed by kind in `models/routing.py: ROUTERS` (Soft MoE is a block of its
    own in models/moe.py).
    """

    # who chooses: every token picks K experts; every expert picks C tokens; or Soft MoE, which mixes tokens into
    # slots instead of placing them (no plan, no capacity rule, nothing dropped)
    choice: Literal["token", "expert", "soft"]
    per_image: bool = False  # one decision per image by the model's image router, reused by every MoE block

    @property
    def has_plan(self) -> bool:
        """Places tokens into fixed-capacity expert buffers (a routing Plan), so tokens may be dropped."""
        return self.choice != "soft"

    @property
    def sweep_axes(self) -> tuple[str, ...]:
        """Inference settings a capacity sweep may vary: K and BPR only where tokens (or images) choose experts;
        expert choice has only its capacity; Soft MoE nothing (its slots are weights and it drops no token)."""
        return {"token": ("k", "capacity_factor", "bpr"), "expert": ("capacity_factor",), "soft": ()}[self.choice]

    def tokens_to_place(self, group_tokens: int, k: int) -> int:
        """What the capacity rule divides over the experts: S x K choices for token choice, S tokens otherwise."""
        return group_tokens * k if self.choice == "token" else group_tokens


ROUTER_KINDS = {
    "token_choice": RouterKind("token"),  # the V-MoE router: noisy top-K softmax gates, optional BPR
    "expert_choice": RouterKind("expert"),  # softmax gates, each expert takes its top-C tokens
    "soft": RouterKind("soft"),  # Soft MoE: slots are softmax mixtures of one image's tokens
    "sinkhorn_token_choice": RouterKind("token"),  # top-K per token on a Sinkhorn transport plan
    "sinkhorn_expert_choice": RouterKind("expert"),  # top-C per expert on a Sinkhorn transport plan
    "sparsity_constrained": RouterKind("expert"),  # top-C per expert on a transport plan with <= C tokens per expert
    "sparsity_constrained_token_choice": RouterKind("token"),  # top-K per token on one with <= K experts per token
    "per_image": RouterKind("token", per_image=True),  # Mobile V-MoE: one top-K decision per image
}
RouterName = Literal[tuple(ROUTER_KINDS)]  # the recipe's vocabulary for `model.moe.router`, from the table above


@dataclass
class MoEConfig:
    """The MoE blocks: where they go, how tokens are routed, what the router pays."""

    # "every-N" (blocks N-1, 2N-1, ...), "last-N" (the last N odd blocks) or a list of 0-based blocks
    layers: str | list[int] = "every-2"
    router: RouterName = "token_choice"  # one of ROUTER_KINDS above (for Soft MoE, C = slots per expert)
    num_experts: int = 8  # E
    k: int = 2  # experts selected per token
    capacity_factor: float | None = 1.05  # cf: C = ceil(tokens_to_place * cf / E); exclusive with `capacity`
    capacity: int | None = None  # fixed C per expert per group, instead of cf
    capacity_multiple: int = 4  # C rounded up to a multiple of this (1 = no rounding)
    # tokens_to_place * cf / E to a whole C before the multiple: up (the V-MoE paper), or to the nearest with
    # Python's half-to-even `round` (the official `capacity_ceil_or_round: round`, used by Soft MoE's expert choice)
    capacity_rounding: Literal["ceil", "round"] = "ceil"
    group_images: int = 8  # images per routing group (all their tokens, CLS included)
    group_size: int | None = None  # tokens per routing group instead (official `group_size`: 8 x tokens per
    #   image); groups may then straddle images. Batches whose tokens it does not divide get whole-image groups
    bfloat16_dispatch: bool = False  # round tokens to bfloat16 before the experts and their outputs before the
    #   combine, as the official dispatcher (`bfloat16: True`) does
    bpr: bool = False  # Batch Priority Routing: place tokens by descending top-1 gate
    # routers whose tokens choose (token_choice, sinkhorn_token_choice, per_image): true = no buffers, no capacity:
    # every chosen (token, expert) pair computed once, nothing dropped, so (but for Sinkhorn, whose choice looks at
    # the group) a token's output does not depend on the rest of the batch; false = fixed-capacity buffers;
    # null = dropless for per_image at inference only (one image then costs one expert MLP per block at K=1)
    dropless: bool | None = None
    noise_std: float = 1.0  # training noise on router logits has std noise_std / E; none at evaluation
    expert_init: Literal["identical", "independent"] = "identical"  # paper: every expert starts the same
    expert_dropout: float = 0.0  # dropout inside the experts (official S/32 configs use 0.2)
    importance_weight: float = 0.005  # importance auxiliary loss
    load_weight: float = 0.005  # load auxiliary loss (only when noise is on)
    gshard_weight: float = 0.0  # GShard load-balancing loss
    zloss_weight: float = 0.0  # ST-MoE router z-loss
    # per_image only: the super-class (0..E-1) of each class, or the path of a `vmoe superclasses` JSON file,
    # read when the recipe is loaded; the image router then learns to predict the image's super-class
    superclasses: str | list[int] | None = None
    superclass_weight: float = 0.3  # weight of that cross-entropy guidance loss

    @property
    def kind(self) -> RouterKind:
        """The facts of this config's router kind."""
        return ROUTER_KINDS[self.router]

    def dropless_at(self, training: bool) -> bool:
        """Whether the MoE blocks run dropless in training or at inference: as set, or by default (null) only
        per-image routing at inference, where one image then costs one expert MLP per MoE block and K=1."""
        if self.dropless is not None:
            return self.dropless
        return self.kind.per_image and not training

    def group_tokens(self, batch: int | None, tokens_per_image: int) -> int:
        """Tokens S per routing group for a batch of `batch` images of `tokens_per_image` tokens (None: a batch
        that divides evenly).

        `group_size` when it divides the batch's tokens; otherwise all tokens of the largest number of images
        that divides `batch` and is not above `group_images` (or group_size // tokens_per_image). Groups must be
        equal so that every group gets the same capacity; a batch that does not divide (the last evaluation
        batch, a latency run of 1 image) gets smaller groups.
        """
        most = self.group_images if self.group_size is None else max(1, self.group_size // tokens_per_image)
        if batch is None:
            return self.group_size or most * tokens_per_image
        if self.group_size is not None and (batch * tokens_per_image) % self.group_size == 0:
            return self.group_size
        images = next(g for g in range(min(batch, most), 0, -1) if batch % g == 0)
        return images * tokens_per_image

    def soft_slots(self, tokens: int) -> int:
        """Soft MoE slots per expert for `tokens` per image: the fixed `capacity`, or round(tokens * cf / E)."""
        if self.capacity is not None:
            return self.capacity
        return max(1, round(tokens * self.capacity_factor / self.num_experts))

    def validate(self, depth: int) -> None:
        """Raise VmoeError naming the key when the settings cannot work for `depth` blocks."""
        if self.num_experts < 1:
            raise VmoeError("model.moe.num_experts must be >= 1")
        if not 1 <= self.k <= self.num_experts:
            raise VmoeError(f"model.moe.k must be between 1 and num_experts={self.num_experts}, got {self.k}")
        if (self.capacity is None) == (self.capacity_factor is None):
            raise VmoeError("set exactly one of model.moe.capacity_factor and model.moe.capacity (the other to null)")
        if self.capacity is not None and self.capacity < 1:
            raise VmoeError(f"model.moe.capacity must be >= 1, got {self.capacity}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise VmoeError(f"model.moe.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.capacity_multiple < 1:
            raise VmoeError("model.moe.capacity_multiple must be >= 1 (1 turns rounding off)")
        if self.group_images < 1:
            raise VmoeError("model.moe.group_images must be >= 1")
        if self.group_size is not None and self.group_size < 1:
            raise VmoeError(f"model.moe.group_size must be >= 1 tokens (or null), got {self.group_size}")
        moe_layer_indices(self.layers, depth)
        if self.dropless and self.kind.choice != "token":
            choosers = ", ".join(name for name, kind in ROUTER_KINDS.items() if kind.choice == "token")
            raise VmoeError(
                f"model.moe.dropless=true needs a router whose tokens choose experts ({choosers}); "
                f"{self.router} drops no token's choice: set model.moe.dropless to null"
            )
        if self.superclasses is not None and not self.kind.per_image:
            raise VmoeError("model.moe.superclasses guides the per-image router: set model.moe.router=per_image")
        if isinstance(self.superclasses, list) and any(not 0 <= g < self.num_experts for g in self.superclasses):
            raise VmoeError(f"model.moe.superclasses must be super-classes 0..{self.num_experts - 1} (one per expert)")


@dataclass
class ModelConfig:
    """A ViT, or a V-MoE when `moe` is set."""

    variant: str = "S/16"  # "SIZE/PATCH", sizes in models/presets.py (Ti, S, B, L, H, vmoe-S, nano, micro)
    image_size: int = 224  # input height = width, a multiple of the patch size
    channels: int = 3  # input channels
    num_classes: int = 1000  # head outputs; 0 = no head (features only)
    pool: Literal["cls", "gap"] = "cls"  # CLS token, or mean of the patch tokens
    # how images become tokens: one P x P patchify conv (ViT), or early convolutions (Xiao et al. 2021):
    # ceil(log2 P) 3x3 stride-2 convs with GELU, channels doubling up to D, then a 1x1 conv; same token grid
    stem: Literal["patch", "conv"] = "patch"
    representation_size: int | None = None  # pre-logits Dense+tanh width; null = none
    depth: int | None = None  # override the variant's number of blocks
    width: int | None = None  # override the variant's token width D
    mlp_dim: int | None = None  # override the variant's MLP hidden size H
    heads: int | None = None  # override the variant's attention heads
    dropout: float = 0.0  # dropout after attention and MLP outputs
    layer_norm_eps: float = 1e-6  # as the official JAX models
    gelu: Literal["tanh", "exact"] = "tanh"  # tanh approximation, as flax.linen.gelu
    moe: MoEConfig | None = None  # null = dense ViT

    def sizes(self) -> tuple[int, int, int, int, int]:
        """(depth, width, mlp_dim, heads, patch) after applying the overrides to the variant."""
        size, patch = parse_variant(self.variant)
        return (
            self.depth or size.depth,
            self.width or size.width,
            self.mlp_dim or size.mlp_dim,
            self.heads or size.heads,
            patch,
        )

    @property
    def tokens_per_image(self) -> int:
        """Patches plus the CLS token when pooling by CLS."""
        patch = self.sizes()[4]
        return (self.image_size // patch) ** 2 + (self.pool == "cls")

    def moe_layers(self) -> list[int]:
        """0-based indices of the blocks whose MLP is an MoE (empty for a dense ViT)."""
        return [] if self.moe is None else moe_layer_indices(self.moe.layers, self.sizes()[0])

    def validate(self) -> None:
        """Raise VmoeError naming the key when the model cannot be built."""
        depth, width, _, heads, patch = self.sizes()
        if self.image_size % patch:
            raise VmoeError(f"model.image_size={self.image_size} is not a multiple of the patch size {patch}")
        if width % heads:
            raise VmoeError(f"model width {width} is not divisible by heads={heads}")
        grid = self.image_size // patch
        if self.stem == "conv" and (side := conv_stem_sides(self.image_size, patch)[-1]) != grid:
            raise VmoeError(
                f"model.stem=conv: {conv_stem_depth(patch)} stride-2 convs turn {self.image_size} px into a "
                f"{side}-token side, not {grid}; use a power-of-2 patch or stem=patch"
            )
        if self.moe is not None:
            self.moe.validate(depth)


def conv_stem_depth(patch: int) -> int:
    """Stride-2 convs of the conv stem for patch size P: ceil(log2 P), at least one."""
    return max(1, math.ceil(math.log2(patch)))


def conv_stem_channels(width: int, patch: int) -> list[int]:
    """Output channels of the conv stem's stride-2 convs, doubling up to `width`."""
    n = conv_stem_depth(patch)
    return [max(1, width >> (n - 1 - i)) for i in range(n)]


def conv_stem_sides(image_size: int, patch: int) -> list[int]:
    """Image side after each stride-2 conv of the conv stem (3x3, padding 1: s -> ceil(s / 2)); the last is the grid."""
    sides = [image_size]
    for _ in range(conv_stem_depth(patch)):
        sides.append((sides[-1] + 1) // 2)
    return sides[1:]


def moe_layer_indices(spec: str | list[int], depth: int) -> list[int]:
    """Resolve "every-N", "last-N" or an explicit list into sorted 0-based block indices."""
    if isinstance(spec, list):
        bad = [i for i in spec if not 0 <= i < depth]
        if bad:
            raise VmoeError(f"model.moe.layers has blocks {bad} outside 0..{depth - 1}")
        return sorted(set(spec))
    kind, _, num = spec.partition("-")
    if kind not in ("every", "last") or not num.isdigit() or int(num) < 1:
        raise VmoeError(f"model.moe.layers={spec!r}: use 'every-N', 'last-N' or a list of block indices")
    n = int(num)
    if kind == "every":
        return list(range(n - 1, depth, n))
    odd = list(range(1, depth, 2))
    if n > len(odd):
        raise VmoeError(f"model.moe.layers={spec!r}: only {len(odd)} odd blocks in a {depth}-block model")
    return odd[-n:]
