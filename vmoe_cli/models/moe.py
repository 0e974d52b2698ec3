"""The MoE MLP block: router -> dispatch into expert buffers -> stacked experts -> combine.

Shape letters: B images, N tokens per image, G groups, S tokens per group, D width,
H expert hidden size, E experts, K choices per token, C capacity, A = G*S*K assignments.

Experts are stacked tensors with the expert axis first (`[E, D, H]`, `[E, H, D]`) and run
as one batched matmul over fixed `[E, G*C, D]` buffers. Dispatch fills the buffers with
one gather of token rows; combine gathers each token's K output rows back and sums them
weighted by the router's gates. Nothing of size tokens x E x C is ever built, unlike
one-hot einsum dispatch, and the buffers' size is known before the data arrives.

Dropless execution (`MoEConfig.dropless`) has no buffers: the A assignments are sorted by
expert, each expert runs on exactly its rows, and the same combine brings them back. Nothing is dropped, and
unless the choice itself looks at the group (Sinkhorn), a token's output does not depend on the other tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.expert_parallel import ExpertGroup, agreed_rows, local_slice, return_to_senders, send_to_owners
from vmoe_cli.models.routing import Plan, RouterOutput, make_router


def buffer_rows(plan: Plan) -> Tensor:
    """Flat row of each assignment in the `[E, G, C]` buffers; dropped ones get row E*G*C.  [G, S, K]"""
    G = plan.expert_GSK.shape[0]
    group_G11 = torch.arange(G, device=plan.expert_GSK.device).view(G, 1, 1)
    row_GSK = (plan.expert_GSK * G + group_G11) * plan.capacity + plan.slot_GSK
    return torch.where(plan.kept_GSK, row_GSK, plan.num_experts * G * plan.capacity)


def dispatch(x_GSD: Tensor, plan: Plan, row_GSK: Tensor) -> Tensor:
    """Gather each buffer slot's token: `[G, S, D]` -> `[E, G*C, D]`.

    An empty slot reads the batch's first token: combine never reads its output, so its gradient is
    exactly zero and the result is the same as with a zero row, without copying `x` to append one.
    """
    G, S, D = x_GSD.shape
    E, C, K = plan.num_experts, plan.capacity, row_GSK.shape[-1]
    token_GSK = torch.arange(G * S, device=x_GSD.device).view(G, S, 1).expand(G, S, K)
    # Which token fills each slot. Dropped choices write to one spare entry past the end, which is cut off.
    source = torch.zeros(E * G * C + 1, dtype=torch.long, device=x_GSD.device)
    source = source.scatter_(0, row_GSK.flatten(), token_GSK.flatten())[:-1]
    return x_GSD.reshape(G * S, D).index_select(0, source).view(E, G * C, D)


def sort_by_expert(x_GSD: Tensor, plan: Plan) -> tuple[Tensor, list[int], Tensor]:
    """Dropless dispatch: the token row of every assignment, sorted by expert (stable, so token order within an
    expert), the rows of each expert, and each assignment's row in that order.  [A, D], E counts, [G, S, K]

    The counts are read back to the host, the one synchronisation of the block and only in dropless mode: they
    set the shapes of the experts' matmuls. (`F.grouped_mm` would take them on the device, but on CPU it needs
    16-byte-aligned rows, has no bias and is invisible to `FlopCounterMode`.)
    """
    G, S, D = x_GSD.shape
    K = plan.expert_GSK.shape[-1]
    expert_A = plan.expert_GSK.flatten()  # token-major: assignment a is token a // K's choice a % K
    order_A = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=plan.num_experts).tolist()
    rows_AD = x_GSD.reshape(G * S, D).index_select(0, order_A // K)
    position_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(len(order_A), device=order_A.device))
    return rows_AD, counts, position_A.view(G, S, K)


@torch.compiler.disable  # eager under torch.compile: the counts would make it recompile for every batch
def dropless_experts(x_GSD: Tensor, plan: Plan, experts: Experts) -> tuple[Tensor, Tensor]:
    """Every assignment of `plan` through its expert, no buffers: the outputs `[1, A, D]` and each assignment's
    row in them `[G, S, K]`, for `combine`."""
    rows_AD, counts, row_GSK = sort_by_expert(x_GSD, plan)
    return experts.sorted_rows(rows_AD, counts).unsqueeze(0), row_GSK


def combine(out_ECD: Tensor, plan: Plan, row_GSK: Tensor) -> Tensor:
    """Each token's gate-weighted sum of its expert outputs: `[E, G*C, D]` -> `[G, S, D]`.

    A dropped choice gets weight 0, so a token dropped by all its experts gets zero.
    """
    E, GC, D = out_ECD.shape
    G, S, K = row_GSK.shape
    rows = out_ECD.reshape(E * GC, D).index_select(0, row_GSK.clamp(max=E * GC - 1).flatten())
    weight_GSK1 = (plan.weight_GSK * plan.kept_GSK).to(rows.dtype).unsqueeze(-1)
    # A product and a sum over K, not einsum: that would be G*S batched 1 x K x D matmuls, much slower on CPU.
    # K = 1 needs no sum, which would cost a copy forward and an expand backward.
    weighted_GSKD = weight_GSK1 * rows.view(G, S, K, D)
    return weighted_GSKD.squeeze(2) if K == 1 else weighted_GSKD.sum(dim=2)


class Experts(nn.Module):
    """E two-layer GELU MLPs stored stacked, applied to `[E, rows, D]` by batched matmuls.

    Under expert parallelism (`shard`) this rank keeps only its L = E / N experts, and forward sends each
    expert's rows to the rank that holds it and the outputs back (models/expert_parallel.py).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, gelu: str, dropout: float, init: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, 1, dim))
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.dropout = nn.Dropout(dropout)
        self.ep: ExpertGroup | None = None  # set by `shard`
        self.reset_parameters(identical=init == "identical")

    @torch.no_grad()
    def reset_parameters(self, identical: bool) -> None:
        """Xavier-uniform kernels and tiny normal biases (as the JAX ViT); identical or per expert."""
        for w in (self.w1, self.w2):
            for w_e in w:
                nn.init.xavier_uniform_(w_e)
        for b in (self.b1, self.b2):
            nn.init.normal_(b, std=1e-6)
        if identical:  # the paper: every expert starts as a copy of the first
            for p in self.parameters():
                p.copy_(p[:1].clone().expand_as(p))

    @torch.no_grad()
    def shard(self, ep: ExpertGroup) -> None:
        """Keep only this rank's experts of the full `[E, ...]` weights; exchange rows with `ep` in forward."""
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(local_slice(p, ep).clone(), requires_grad=p.requires_grad))
        self.ep = ep

    def forward(self, x_ERD: Tensor) -> Tensor:
        if self.ep is None:
            return self.mlp(x_ERD)
        R = x_ERD.shape[1]
        # training: every rank's micro-batch, hence its buffers, has one size; evaluation pads to the largest
        rows = R if self.training else agreed_rows(R, self.ep, x_ERD.device)
        x_ERD = F.pad(x_ERD, (0, 0, 0, rows - R)) if rows > R else x_ERD
        out_ERD = return_to_senders(self.mlp(send_to_owners(x_ERD, self.ep)), self.ep)
        return out_ERD[:, :R]

    def sorted_rows(self, x_AD: Tensor, counts: list[int]) -> Tensor:
        """Dropless: expert e on the next `counts[e]` rows of `x_AD` (rows sorted by expert), one matmul pair per
        expert that has rows.  [A, D] -> [A, D]"""
        # unbind: one stack of the per-expert gradients in backward, not a full-size zero tensor per expert
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        outs = []
        for e, x_RD in enumerate(x_AD.split(counts)):
            if len(x_RD):
                h_RH = F.gelu(torch.addmm(b1[e], x_RD, w1[e]), approximate=self.approximate)
                outs.append(torch.addmm(b2[e], self.dropout(h_RH), w2[e]))
        return self.dropout(torch.cat(outs))

    def mlp(self, x_LRD: Tensor) -> Tensor:
        """This rank's experts on their rows: `[L, rows, D]` -> `[L, rows, D]`."""
        h_LRH = F.gelu(torch.baddbmm(self.b1, x_LRD, self.w1), approximate=self.approximate)
        return self.dropout(torch.baddbmm(self.b2, self.dropout(h_LRH), self.w2))


@dataclass
class MlpOutput:
    """What every MLP of a block returns (dense, MoE or Soft MoE), so the block treats them alike."""

    y: Tensor  # [B, N, D]
    routing: RouterOutput | None = None  # None for a dense MLP


class MoEMlp(nn.Module):
    """Drop-in replacement of a block's MLP: routes groups of images' tokens to E experts."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, gelu: str = "tanh"):
        super().__init__()
        self.cfg = cfg
        self.router = make_router(dim, cfg)
        self.experts = Experts(cfg.num_experts, dim, hidden, gelu, cfg.expert_dropout, cfg.expert_init)

    def forward(self, x_BND: Tensor, image_logits_BE: Tensor | None = None) -> MlpOutput:
        """`image_logits_BE`: the model's per-image router logits, when routing is per image."""
        B, N, D = x_BND.shape
        S = self.cfg.group_tokens(B, N)
        x_GSD = x_BND.reshape(-1, S, D)  # each group: consecutive tokens of the batch
        routing = self.router(x_GSD, image_logits_BE)
        plan = routing.plan
        if self.cfg.bfloat16_dispatch:  # as the official Bfloat16Dispatcher: only the data moved is rounded
            x_GSD = x_GSD.to(torch.bfloat16).to(x_GSD.dtype)
        if self.dropless:
            # No buffers: the plan's capacity becomes S, the most choices one expert can get from a group (a token
            # chooses an expert at most once), so no slot counts as dropped, in the metrics too.
            plan.capacity = S
            out_ECD, row_GSK = dropless_experts(x_GSD, plan, self.experts)  # E = 1, one row per assignment
        else:
            row_GSK = buffer_rows(plan)
            out_ECD = self.experts(dispatch(x_GSD, plan, row_GSK))
        if self.cfg.bfloat16_dispatch:
            out_ECD = out_ECD.to(torch.bfloat16).to(x_GSD.dtype)
        y_GSD = combine(out_ECD, plan, row_GSK)
        return MlpOutput(y=y_GSD.reshape(B, N, D), routing=routing)

    @property
    def dropless(self) -> bool:
        """Whether this forward runs dropless (`MoEConfig.dropless_at`). Never under expert parallelism, whose
        exchanges have fixed sizes: an explicit `dropless: true` is refused there when the recipe loads, and
        per-image routing then evaluates with its capacity."""
        return self.experts.ep is None and self.cfg.dropless_at(self.training)


class SoftMoEMlp(nn.Module):
    """Soft MoE (Puigcerver et al. 2023): every slot is a softmax mixture of one image's tokens, every token a
    softmax mixture of all slot outputs. No token is dropped and there is no auxiliary loss.

    Tokens and the slot parameters `phi` `[D, E, slots]` are L2-normalised along D; a learned `scale` (init 1)
    multiplies the logits. Slots per expert: `capacity` if given, else round(tokens per image * cf / E).
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, tokens: int, gelu: str = "tanh"):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.phi = nn.Parameter(torch.randn(dim, E, cfg.soft_slots(tokens)) / dim**0.5)  # LeCun normal: fan-in D
        self.scale = nn.Parameter(torch.ones(()))
        self.experts = Experts(E, dim, hidden, gelu, cfg.expert_dropout, cfg.expert_init)

    def forward(self, x_BND: Tensor, image_logits_BE: Tensor | None = None) -> MlpOutput:
        """`image_logits_BE` is ignored: Soft MoE mixes each image's tokens on its own."""
        B, N, D = x_BND.shape
        E, P = self.phi.shape[1:]
        x_norm = F.normalize(x_BND.float(), dim=-1, eps=1e-6)
        phi_norm = F.normalize(self.phi.float(), dim=0, eps=1e-6)
        logits_BNEP = self.scale * torch.einsum("bnd,dep->bnep", x_norm, phi_norm)
        dispatch_BNEP = logits_BNEP.softmax(dim=1).to(x_BND.dtype)  # over the image's tokens, per slot
        combine_BNEP = logits_BNEP.flatten(2).softmax(dim=-1).view(B, N, E, P).to(x_BND.dtype)  # over all slots
        slots_EBPD = torch.einsum("bnep,bnd->ebpd", dispatch_BNEP, x_BND)  # unnormalised tokens mixed
        out_EBPD = self.experts(slots_EBPD.reshape(E, B * P, D)).view(E, B, P, D)
        y_BND = torch.einsum("bnep,ebpd->bnd", combine_BNEP, out_EBPD)
        zero = x_BND.new_zeros((), dtype=torch.float32)
        metrics = {"dropped_all": zero, "dropped_any": zero, "scale": self.scale.detach().float()}
        routing = RouterOutput(plan=None, aux_loss=zero, compute_metrics=lambda: metrics, dispatch_BNEP=dispatch_BNEP)
        return MlpOutput(y=y_BND, routing=routing)


def make_moe_mlp(dim: int, hidden: int, cfg: MoEConfig, tokens: int, gelu: str) -> nn.Module:
    """The MoE MLP of `cfg`'s router kind for images of `tokens` tokens: Soft MoE, or routed to expert buffers."""
    if cfg.kind.has_plan:
        return MoEMlp(dim, hidden, cfg, gelu)
    return SoftMoEMlp(dim, hidden, cfg, tokens, gelu)
