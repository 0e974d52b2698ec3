"""Vision Transformer and V-MoE, read top to bottom: attention, MLP, block, model.

Shape letters: B images, N tokens per image, D width, H MLP hidden size, P patch size.
A V-MoE is a ViT whose chosen blocks have an MoE MLP (models/moe.py) instead of a dense one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmoe_cli.models.config import ModelConfig, conv_stem_channels
from vmoe_cli.models.moe import MlpOutput, make_moe_mlp
from vmoe_cli.models.routing import PerImageRouter, RouterOutput

# MoEConfig fields that may change after training (set_routing)
ROUTING_SETTINGS = ("k", "capacity_factor", "capacity", "capacity_multiple", "capacity_rounding", "group_images",
                    "group_size", "bpr", "bfloat16_dispatch", "dropless")  # fmt: skip


class Attention(nn.Module):
    """Multi-head self-attention; the q, k and v projections are stored stacked in one `qkv` Linear `[3D, D]`."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        # One projection per row block of the fused weight: each [B, N, D] output viewed as [B, h, N, D/h] is
        # dense, so attention's backward writes its gradients in that layout. Split from one [B, N, 3D] output,
        # the three gradients would be stacked and copied back to token-major order.
        q, k, v = (
            F.linear(x_BND, w, b).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # [B, h, N, D/h]
            for w, b in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), strict=True)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, D/h]
        y = y.transpose(1, 2).reshape(B, N, D)
        return self.dropout(self.proj(y))


class Mlp(nn.Module):
    """The dense two-layer GELU MLP of a transformer block."""

    def __init__(self, dim: int, hidden: int, gelu: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BND: Tensor, image_logits_BE: Tensor | None = None) -> MlpOutput:
        """`image_logits_BE` is ignored: the MLPs of a block share one signature (models/moe.py: MlpOutput)."""
        h_BNH = self.dropout(F.gelu(self.fc1(x_BND), approximate=self.approximate))
        return MlpOutput(self.dropout(self.fc2(h_BNH)))


class ConvStem(nn.Module):
    """Early convolutions instead of patchify (Xiao et al. 2021): 3x3 stride-2 convs with GELU, then 1x1 to D.

    It gives the same `[B, D, h, w]` grid as the P x P patch conv; local non-linear features help a ViT train
    faster on small data.
    """

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        layers: list[nn.Module] = []
        for out in conv_stem_channels(dim, patch):
            layers += [nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1), nn.GELU()]
            channels = out
        self.convs = nn.Sequential(*layers, nn.Conv2d(channels, dim, kernel_size=1))

    def forward(self, images_BCHW: Tensor) -> Tensor:
        return self.convs(images_BCHW)


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x += Attn(LN(x)); x += MLP-or-MoE(LN(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        _, dim, hidden, heads, _ = cfg.sizes()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        if moe:
            self.mlp = make_moe_mlp(dim, hidden, cfg.moe, cfg.tokens_per_image, cfg.gelu)
        else:
            self.mlp = Mlp(dim, hidden, cfg.gelu, cfg.dropout)

    def forward(self, x_BND: Tensor, image_logits_BE: Tensor | None = None) -> tuple[Tensor, RouterOutput | None]:
        """`image_logits_BE`: the per-image router's decision, which a per-image MoE MLP follows."""
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        out = self.mlp(self.norm2(x_BND), image_logits_BE)
        return x_BND + out.y, out.routing


@dataclass
class BlocksOutput:
    """What a run of encoder blocks gives: tokens, and what their routers decided and cost."""

    x_BND: Tensor  # tokens after the last block run
    aux_loss: Tensor  # scalar: the routers' weighted auxiliary losses summed over the MoE blocks run
    routing: dict[int, RouterOutput] = field(default_factory=dict)  # block index -> its routing
    image_logits_BE: Tensor | None = None  # the per-image router's logits, when these blocks made the decision


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B, num_classes], None when the model has no head
    pre_logits: Tensor  # [B, D or representation_size]: the features few-shot probes use
    aux_loss: Tensor  # scalar: the routers' weighted auxiliary losses summed over MoE blocks
    routing: dict[int, RouterOutput] = field(default_factory=dict)  # block index -> its routing
    image_logits_BE: Tensor | None = None  # per-image routing: each image's router logits (training guides them)


class VisionTransformer(nn.Module):
    """ViT / V-MoE: patches -> +pos -> blocks -> LayerNorm -> pool -> [Dense+tanh] -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        depth, dim, _, _, patch = cfg.sizes()
        grid = cfg.image_size // patch
        if cfg.stem == "conv":
            self.patch_embed: nn.Module = ConvStem(cfg.channels, dim, patch)
        else:
            self.patch_embed = nn.Conv2d(cfg.channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + (cfg.pool == "cls"), dim) * 0.02)
        moe_layers = cfg.moe_layers()
        self.first_moe = moe_layers[0] if moe_layers else None  # where a per-image router decides
        self.blocks = nn.ModuleList(Block(cfg, moe=i in moe_layers) for i in range(depth))
        per_image = cfg.moe is not None and cfg.moe.kind.per_image
        self.image_router = PerImageRouter(dim, cfg.moe) if per_image else None  # one decision per image
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        rep = cfg.representation_size
        self.pre_logits = nn.Sequential(nn.Linear(dim, rep), nn.Tanh()) if rep else nn.Identity()
        self.head = nn.Linear(rep or dim, cfg.num_classes) if cfg.num_classes else None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """JAX ViT init: lecun-normal patch embedding (every stem conv), xavier Linear kernels, zero head."""
        for module in self.patch_embed.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=(1.0 / module.weight[0].numel()) ** 0.5)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.head:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=1e-6)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def embed(self, images_BCHW: Tensor) -> Tensor:
        """Images -> tokens with position embeddings, CLS first: `[B, N, D]`."""
        x_BDhw = self.patch_embed(images_BCHW)
        x_BND = x_BDhw.flatten(2).transpose(1, 2)  # patches row-major over the grid
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        # Token-major memory (a no-op after the CLS cat): left as the transposed view, every residual add would
        # inherit its strides and every LayerNorm copy it, forward and backward.
        return (x_BND + self.pos_embed).contiguous()

    def head_from_tokens(self, blocks: BlocksOutput) -> ModelOutput:
        """Final LayerNorm, pooling, representation layer and head on the last block's tokens."""
        x_BND = self.norm(blocks.x_BND)
        pooled_BD = x_BND[:, 0] if self.cfg.pool == "cls" else x_BND.mean(dim=1)
        pre_logits = self.pre_logits(pooled_BD)
        logits = self.head(pre_logits) if self.head is not None else None
        return ModelOutput(logits, pre_logits, blocks.aux_loss, blocks.routing, blocks.image_logits_BE)

    def run_blocks(self, x_BND: Tensor, start: int = 0, stop: int | None = None) -> BlocksOutput:
        """Blocks `start..stop-1` (default: to the last) on tokens.

        Running the dense blocks before the first MoE block once lets a capacity sweep reuse their output.
        """
        if self.image_router is not None and start > self.first_moe:
            raise ValueError(f"per-image routing is decided before block {self.first_moe}; start there or earlier")
        out = BlocksOutput(x_BND, x_BND.new_zeros((), dtype=torch.float32))
        for i in range(start, len(self.blocks) if stop is None else stop):
            if self.image_router is not None and i == self.first_moe:
                out.image_logits_BE, image_aux = self.image_router(out.x_BND)
                out.aux_loss = out.aux_loss + image_aux
            out.x_BND, route = self.blocks[i](out.x_BND, out.image_logits_BE)
            if route is not None:
                out.routing[i] = route
                out.aux_loss = out.aux_loss + route.aux_loss
        return out

    def forward(self, images_BCHW: Tensor) -> ModelOutput:
        return self.head_from_tokens(self.run_blocks(self.embed(images_BCHW)))

    def set_routing(self, **changes: object) -> None:
        """Change K, capacity, rounding, group size, BPR, dispatch precision or dropless execution in place,
        weights untouched.

        All MoE blocks share `cfg.moe`, so one change reaches every router. A capacity factor replaces a fixed
        capacity and a fixed capacity replaces a factor, unless both are given; either, without `dropless`,
        asks for capacity execution (dropless=False).
        """
        moe = self.cfg.moe
        if moe is None:
            raise ValueError("set_routing needs a V-MoE; this model is dense")
        if "capacity_factor" in changes and "capacity" not in changes:
            changes["capacity"] = None
        elif "capacity" in changes and "capacity_factor" not in changes:
            changes["capacity_factor"] = None
        if "capacity" in changes and "dropless" not in changes:
            changes["dropless"] = False
        for name, value in changes.items():
            if name not in ROUTING_SETTINGS:
                raise ValueError(f"{name} is not an inference-time routing setting")
            setattr(moe, name, value)
        self.cfg.validate()


def resize_pos_embed(pos_embed: Tensor, new_grid: int, has_cls: bool) -> Tensor:
    """Bilinearly resize the patch part of `[1, cls + g*g, D]` to a new grid; CLS is kept as is."""
    cls, patches = (pos_embed[:, :1], pos_embed[:, 1:]) if has_cls else (pos_embed[:, :0], pos_embed)
    old_grid = int(patches.shape[1] ** 0.5)
    D = patches.shape[-1]
    grid_1DHW = patches.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)
    grid_1DHW = F.interpolate(grid_1DHW, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid_1DHW.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)], dim=1)
