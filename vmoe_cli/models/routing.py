"""Routers: which buffer slot of which expert each token goes to, and with what weight.

Shape letters: G groups, S tokens per group, D token width, E experts, K choices per
token, C capacity (slots per expert per group), Q a group's K*S choices in priority order;
for a transport problem N rows onto M columns (tokens onto experts, or the transpose), and
R any leading axes.

A router returns a `Plan`: for each token of each group, K assignments, each sending the
token to slot `slot_GSK` of expert `expert_GSK` with combine weight `weight_GSK`. A slot
>= C is a dropped assignment. The MoE block (models/moe.py) turns a plan into fixed-size
`[E, G*C, D]` buffers by one gather and back by one gather and weighted sum.

The file follows the V-MoE paper: capacity, the plan, token choice's plan, its auxiliary
losses and router; then the alternatives (expert choice, Sinkhorn, sparsity-constrained,
per-image) and the table of routers by kind (`ROUTERS`, the kinds' facts being `models/config.py: ROUTER_KINDS`).

Routing arithmetic runs in float32 whatever the model's precision, and nothing here
synchronises with the host (no `.item()`, no boolean indexing), so the block can later
exchange its buffers between ranks with one all_to_all of equal splits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import MoEConfig

# ---------------------------------------------------------------------------------------------------- capacity


def capacity(
    tokens_to_place: int,
    num_experts: int,
    capacity_factor: float | None = None,
    fixed: int | None = None,
    multiple: int = 4,
    rounding: str = "ceil",
) -> int:
    """C = ceil (or round, half to even) of tokens_to_place * cf / E, then up to `multiple`; or the fixed C.

    The product is computed in that order in floating point, as the official code does: 50 * 1.1 / 5 is
    11.000000000000002, so ceil gives 12.
    """
    if fixed is not None:
        c = fixed
    else:
        exact = tokens_to_place * capacity_factor / num_experts
        c = math.ceil(exact) if rounding == "ceil" else round(exact)
        c += -c % multiple
    if c < 1:
        raise VmoeError(f"expert capacity is {c} (< 1): raise the capacity factor or set a fixed capacity")
    return c


def group_capacity(cfg: MoEConfig, group_tokens: int) -> int:
    """C per expert for a routing group of S tokens (what the router kind places: S x K choices or S tokens)."""
    to_place = cfg.kind.tokens_to_place(group_tokens, cfg.k)
    return capacity(
        to_place, cfg.num_experts, cfg.capacity_factor, cfg.capacity, cfg.capacity_multiple, cfg.capacity_rounding
    )


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A routing plan for one MoE layer (see the module docstring)."""

    expert_GSK: Tensor  # long, expert of each of a token's K assignments
    slot_GSK: Tensor  # long, buffer slot within that expert; >= capacity means dropped
    weight_GSK: Tensor  # float32, combine weight (carries the router's gradient)
    capacity: int  # C
    num_experts: int  # E
    requested_GE: Tensor | None = None  # long, choices each expert received, kept or dropped (token choice)

    @property
    def kept_GSK(self) -> Tensor:
        return self.slot_GSK < self.capacity


@dataclass
class RouterOutput:
    plan: Plan | None  # None for Soft MoE, which mixes tokens instead of placing them
    aux_loss: Tensor  # scalar, already weighted, to add to the task loss
    compute_metrics: Callable[[], dict[str, Tensor]]  # the `metrics` below
    logits_GSE: Tensor | None = None  # float32 router logits the choice was made on (noisy in training)
    dispatch_BNEP: Tensor | None = None  # Soft MoE: each slot's softmax weights over its image's N tokens

    @functools.cached_property
    def metrics(self) -> dict[str, Tensor]:
        """Detached scalars or [E] vectors, for logging: computed on first use, so a training step that logs
        nothing skips their ~25 small ops per MoE block."""
        return self.compute_metrics()


def expert_softmax(logits_GSE: Tensor) -> Tensor:
    """Softmax over the experts axis, computed with experts as the middle axis.  [G, S, E]

    PyTorch's CPU softmax over a short last axis (E = 8) runs one row at a time, much slower than over a
    middle axis, where it vectorises across the S tokens; the transposes are views (one copy in, none out).
    """
    return logits_GSE.transpose(1, 2).softmax(dim=1).transpose(1, 2)


def one_hot(index: Tensor, num_classes: int) -> Tensor:
    """`F.one_hot` (long) without its range check, which reads the indices' min and max back to the host:
    a synchronisation per call on GPU. Router indices are in range by construction."""
    return torch.zeros(*index.shape, num_classes, dtype=torch.long, device=index.device).scatter_(
        -1, index.unsqueeze(-1), 1
    )


def token_choice_plan(gates_GSE: Tensor, k: int, capacity_: int, bpr: bool) -> Plan:
    """Top-K experts per token and their buffer slots, with the choices each expert received.

    Slots are handed out rank by rank (every token's first choice before any second
    choice); within a rank tokens go in group order, or by descending top-1 gate with
    Batch Priority Routing. Ties go to the lower expert index and the BPR sort is stable.
    """
    G, S, E = gates_GSE.shape
    # Top-K with ties to the lower expert index: max returns the first maximum, a stable descending sort keeps
    # index order. For K = 1 max is the same choice, much faster on CPU than the sort.
    if k == 1:
        weight_GSK, expert_GSK = gates_GSE.max(dim=-1, keepdim=True)
    else:
        sorted_gates, sorted_experts = torch.sort(gates_GSE, dim=-1, descending=True, stable=True)
        weight_GSK, expert_GSK = sorted_gates[..., :k], sorted_experts[..., :k]
    expert_GKS = expert_GSK.transpose(1, 2)
    # Priority order of the tokens within each rank: group order, or BPR's stable sort.
    if bpr:
        order_GS = torch.sort(weight_GSK[..., 0], dim=-1, descending=True, stable=True).indices
        order_GKS = order_GS.unsqueeze(1).expand(G, k, S)
        expert_GKS = expert_GKS.gather(2, order_GKS)
    # A choice's slot = number of earlier choices (in priority order) for the same expert.
    # The one-hot is choices x E ([G, K*S, E]), never tokens x E x C.
    choices_GQ = expert_GKS.reshape(G, k * S)
    seen_GQE = one_hot(choices_GQ, E).cumsum(dim=1)
    slot_GKS = (seen_GQE.gather(2, choices_GQ.unsqueeze(2)) - 1).view(G, k, S)
    if bpr:  # back from priority order to group order
        slot_GKS = torch.empty_like(slot_GKS).scatter_(2, order_GKS, slot_GKS)
    return Plan(expert_GSK, slot_GKS.transpose(1, 2), weight_GSK, capacity_, E, requested_GE=seen_GQE[:, -1])


# ---------------------------------------------------------------------------------------------------- losses


def importance_loss(gates_GSE: Tensor) -> Tensor:
    """(std / mean)^2 of per-expert summed gates, population std, averaged over groups."""
    importance_GE = gates_GSE.sum(dim=1)
    return _cv_squared(importance_GE)


def load_loss(logits_GSE: Tensor, threshold_GS1: Tensor, sigma: float) -> Tensor:
    """(std / mean)^2 of each expert's probability of being selected under fresh noise.

    A token picks expert e when its clean logit plus noise beats the token's K-th largest
    noisy logit `threshold_GS1`: p = 1 - Phi((threshold - logit) / sigma), averaged over tokens.
    """
    # 1 - Phi(z) = erfc(z / sqrt 2) / 2: half the ops of 1 - ndtr(z) and no cancellation where Phi(z) ~ 1
    p_GSE = 0.5 * torch.special.erfc((threshold_GS1 - logits_GSE) / (sigma * math.sqrt(2.0)))
    return _cv_squared(p_GSE.mean(dim=1))


def gshard_loss(gates_GSE: Tensor) -> Tensor:
    """E^2 * mean_e(mean gate_e * fraction of tokens whose top-1 is e), averaged over groups."""
    num_experts = gates_GSE.shape[-1]
    top1_GSE = one_hot(gates_GSE.argmax(dim=-1), num_experts).to(gates_GSE.dtype)
    per_group = (gates_GSE.mean(dim=1) * top1_GSE.mean(dim=1)).mean(dim=-1)
    return num_experts**2 * per_group.mean()


def z_loss(logits_GSE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the logits."""
    return torch.logsumexp(logits_GSE, dim=-1).square().mean()


def _cv_squared(values_GE: Tensor) -> Tensor:
    mean_G = values_GE.mean(dim=-1)
    var_G = values_GE.var(dim=-1, unbiased=False)
    return (var_G / mean_G.square()).mean()


# ---------------------------------------------------------------------------------------------------- metrics


def _load_metrics(placed_GE: Tensor, capacity_: int) -> dict[str, Tensor]:
    """Per-expert load (tokens placed / C) and the normalised entropy of the placements."""
    load_E = placed_GE.float().mean(dim=0) / capacity_
    share_E = placed_GE.float().sum(dim=0) / placed_GE.sum().clamp(min=1)
    entropy = -(share_E * share_E.clamp(min=1e-12).log()).sum()
    num_experts = placed_GE.shape[-1]
    return {"expert_load": load_E, "load_entropy": entropy / math.log(num_experts) if num_experts > 1 else entropy}


@torch.no_grad()
def _token_choice_metrics(plan: Plan) -> dict[str, Tensor]:
    """Shares of tokens dropped by all and by any of their K choices, and the load of what was placed."""
    dropped_GSK = ~plan.kept_GSK
    return {
        "dropped_all": dropped_GSK.all(dim=-1).float().mean(),
        "dropped_any": dropped_GSK.any(dim=-1).float().mean(),
        **_load_metrics(plan.requested_GE.clamp(max=plan.capacity), plan.capacity),
    }


@torch.no_grad()
def _expert_choice_metrics(plan: Plan) -> dict[str, Tensor]:
    """Shares of tokens processed by 0, 1 and 2+ experts (dropped = 0: there is no K to miss), and the load."""
    experts_GS = plan.kept_GSK.sum(dim=-1)  # choice e of every token is expert e
    metrics = {
        "tokens_0_experts": (experts_GS == 0).float().mean(),
        "tokens_1_expert": (experts_GS == 1).float().mean(),
        "tokens_2plus_experts": (experts_GS >= 2).float().mean(),
    }
    metrics["dropped_all"] = metrics["dropped_any"] = metrics["tokens_0_experts"]
    return metrics | _load_metrics(plan.kept_GSK.sum(dim=1), plan.capacity)


# ---------------------------------------------------------------------------------------------------- token choice


class LinearRouter(nn.Module):
    """A router's shared part: logits = x @ W (no bias) in float32, plus noise of std noise_std / E in training.

    Every router's forward takes `(x_GSD, image_logits_BE=None)`; only the per-image one reads the second.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg  # shared with the model, so K / capacity / BPR can change at inference
        self.proj = nn.Linear(dim, cfg.num_experts, bias=False)

    @property
    def sigma(self) -> float:
        """Std of the noise on the logits: noise_std / E in training, 0 at evaluation."""
        return self.cfg.noise_std / self.cfg.num_experts if self.training else 0.0

    def logits(self, x_GSD: Tensor) -> tuple[Tensor, Tensor]:
        """The clean logits `[G, S, E]` and those the choice is made on (noisy in training)."""
        logits_GSE = F.linear(x_GSD.float(), self.proj.weight.float())
        if self.sigma > 0:
            return logits_GSE, logits_GSE + self.sigma * torch.randn_like(logits_GSE)
        return logits_GSE, logits_GSE


class TokenChoiceRouter(LinearRouter):
    """The V-MoE router: noisy top-K softmax gating, capacity and optional BPR (token_choice_plan)."""

    def forward(self, x_GSD: Tensor, image_logits_BE: Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        logits_GSE, noisy_logits_GSE = self.logits(x_GSD)
        gates_GSE = expert_softmax(noisy_logits_GSE)
        plan = token_choice_plan(gates_GSE, cfg.k, group_capacity(cfg, x_GSD.shape[1]), cfg.bpr)

        clean_gates_GSE = expert_softmax(logits_GSE)
        losses = {"importance_loss": importance_loss(clean_gates_GSE)}
        aux = cfg.importance_weight * losses["importance_loss"]
        if self.sigma > 0:
            # The K-th largest noisy logit is that of the K-th choice (softmax keeps the order): no second top-K.
            threshold_GS1 = noisy_logits_GSE.gather(2, plan.expert_GSK[..., cfg.k - 1 :])
            losses["load_loss"] = load_loss(logits_GSE, threshold_GS1, self.sigma)
            aux = aux + cfg.load_weight * losses["load_loss"]
        if cfg.gshard_weight:  # on the gates the choice was made on (noisy in training), as the official code
            losses["gshard_loss"] = gshard_loss(gates_GSE)
            aux = aux + cfg.gshard_weight * losses["gshard_loss"]
        if cfg.zloss_weight:
            losses["z_loss"] = z_loss(logits_GSE)
            aux = aux + cfg.zloss_weight * losses["z_loss"]

        def metrics() -> dict[str, Tensor]:
            return {name: value.detach() for name, value in losses.items()} | _token_choice_metrics(plan)

        return RouterOutput(plan, aux, metrics, noisy_logits_GSE)


# ---------------------------------------------------------------------------------------------------- expert choice


def expert_choice_plan(gates_GSE: Tensor, capacity_: int) -> Plan:
    """Each expert takes the C tokens with the largest gate in its column; ties go to the earlier token.

    As a Plan with K = E: a token's choice e is expert e, its slot the token's rank in expert e's order,
    kept when that rank is below C. A token may so be processed by 0 to E experts.
    """
    G, S, E = gates_GSE.shape
    order_GES = torch.sort(gates_GSE.transpose(1, 2), dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(S, device=gates_GSE.device).expand(G, E, S)
    rank_GES = torch.empty_like(order_GES).scatter_(2, order_GES, ranks)  # token -> its place in the order
    expert_GSE = torch.arange(E, device=gates_GSE.device).expand(G, S, E)
    return Plan(expert_GSE, rank_GES.transpose(1, 2), gates_GSE, capacity=capacity_, num_experts=E)


class ExpertChoiceRouter(LinearRouter):
    """Softmax expert choice (Zhou et al. 2022, as in "Routers in Vision MoE"): experts pick tokens, no aux loss."""

    def forward(self, x_GSD: Tensor, image_logits_BE: Tensor | None = None) -> RouterOutput:
        C = group_capacity(self.cfg, x_GSD.shape[1])
        _, logits_GSE = self.logits(x_GSD)
        plan = expert_choice_plan(expert_softmax(logits_GSE), C)
        return RouterOutput(plan, logits_GSE.new_zeros(()), lambda: _expert_choice_metrics(plan), logits_GSE)


# ---------------------------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_transport(logits_GSE: Tensor, iterations: int = 20) -> Tensor:
    """Entropic optimal transport (epsilon 1) of tokens (mass 1 each) onto experts (mass S/E each).  [G, S, E]

    kernel = exp(logits) (shifted by the group's max, which the scalings absorb); `iterations` rounds of
    v = b / (kernel^T u), u = a / (kernel v); the transport plan is diag(u) kernel diag(v). No gradient flows
    through it.
    """
    with torch.no_grad():
        G, S, E = logits_GSE.shape
        kernel_GSE = torch.exp(logits_GSE - logits_GSE.amax(dim=(1, 2), keepdim=True))
        u_GS1 = torch.ones(G, S, 1, device=logits_GSE.device)
        for _ in range(iterations):  # elementwise products and sums: no matmul, as FLOPs count matmuls only
            v_G1E = (S / E) / (kernel_GSE * u_GS1).sum(dim=1, keepdim=True)
            u_GS1 = 1.0 / (kernel_GSE * v_G1E).sum(dim=2, keepdim=True)
        return u_GS1 * kernel_GSE * v_G1E


class SinkhornRouter(LinearRouter):
    """Sinkhorn token choice (top-K per token on the transport plan, BPR by its row max) or expert choice (top-C
    per expert on it); combine weights are the softmax of the logits, so the router learns through them."""

    def transport(self, logits_GSE: Tensor, capacity_: int) -> Tensor:
        """The plan the choice is made on (without gradient): here Sinkhorn's entropic one.  [G, S, E]"""
        return sinkhorn_transport(logits_GSE)

    def forward(self, x_GSD: Tensor, image_logits_BE: Tensor | None = None) -> RouterOutput:
        cfg = self.cfg
        C = group_capacity(cfg, x_GSD.shape[1])
        _, logits_GSE = self.logits(x_GSD)
        transport_GSE = self.transport(logits_GSE, C)
        gates_GSE = expert_softmax(logits_GSE)
        if cfg.kind.choice == "expert":
            plan = expert_choice_plan(transport_GSE, C)
            plan.weight_GSK = gates_GSE
            return RouterOutput(plan, logits_GSE.new_zeros(()), lambda: _expert_choice_metrics(plan), logits_GSE)
        plan = token_choice_plan(transport_GSE, cfg.k, C, cfg.bpr)
        plan.weight_GSK = gates_GSE.gather(2, plan.expert_GSK)
        return RouterOutput(plan, logits_GSE.new_zeros(()), lambda: _token_choice_metrics(plan), logits_GSE)


# ------------------------------------------------------------------------------------------------- sparsity-constrained


def sparse_simplex_projection(x_RN: Tensor, k: int) -> Tensor:
    """Euclidean projection of each row onto the probability simplex, keeping at most k non-zeros.  [R, N]

    Take the k largest entries u (descending; ties to the earlier entry); rho = the number of j with
    u_j + (1 - sum_{l<=j} u_l) / j > 0, tau = (sum_{l<=rho} u_l - 1) / rho; p = max(u - tau, 0) on those k
    entries, 0 elsewhere (Kyrillidis et al. 2013: the best k-sparse projection keeps the k largest entries).
    """
    k = min(k, x_RN.shape[-1])
    u_RK, index_RK = torch.sort(x_RN, dim=-1, descending=True, stable=True)
    u_RK, index_RK = u_RK[..., :k], index_RK[..., :k]
    cumsum_RK = u_RK.cumsum(dim=-1)
    j_K = torch.arange(1, k + 1, device=x_RN.device, dtype=x_RN.dtype)
    rho_R1 = (u_RK + (1 - cumsum_RK) / j_K > 0).sum(dim=-1, keepdim=True).clamp(min=1)  # the condition holds
    tau_R1 = (cumsum_RK.gather(-1, rho_R1 - 1) - 1) / rho_R1  # for a prefix of j, so counting it finds rho
    return torch.zeros_like(x_RN).scatter_(-1, index_RK, (u_RK - tau_R1).clamp(min=0))


def sparsity_constrained_transport(
    similarity_GNM: Tensor, k: int, row_mass: float, column_mass: float, iterations: int = 20, lr: float = 1e-2
) -> Tensor:
    """Quadratically regularised optimal transport (gamma 1) of N rows onto M columns, with at most k non-zeros in
    each column: rows of mass `row_mass`, columns of mass `column_mass`, cost = -similarity.  [G, N, M]

    Solved through its semi-dual (Liu, Puigcerver and Blondel 2023), with a = row_mass and b = column_mass:
    minimise over alpha (one per row) F(alpha) = sum_m b max_k(alpha + similarity[:, m]) - <alpha, a>, whose
    gradient is the plan's row sums minus a, column m of the plan being
    b * sparse_simplex_projection((alpha + similarity[:, m]) / b, k).
    `iterations` Adam steps from alpha = 0, written out on tensors; no gradient flows through the solve.
    Each column of the result sums to `column_mass` with at most k non-zeros; its row sums approach `row_mass`.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # Adam's defaults
    with torch.no_grad():
        G, N, _ = similarity_GNM.shape
        similarity_GMN = similarity_GNM.float().transpose(1, 2).contiguous()  # the projection runs along N

        def plan_GMN(alpha_G1N: Tensor) -> Tensor:
            return column_mass * sparse_simplex_projection((alpha_G1N + similarity_GMN) / column_mass, k)

        alpha_G1N = similarity_GMN.new_zeros(G, 1, N)
        mean_G1N, square_G1N = torch.zeros_like(alpha_G1N), torch.zeros_like(alpha_G1N)
        for step in range(1, iterations + 1):
            grad_G1N = plan_GMN(alpha_G1N).sum(dim=1, keepdim=True) - row_mass
            mean_G1N.lerp_(grad_G1N, 1 - beta1)
            square_G1N.lerp_(grad_G1N.square(), 1 - beta2)
            denom_G1N = (square_G1N / (1 - beta2**step)).sqrt_().add_(eps)
            alpha_G1N.addcdiv_(mean_G1N, denom_G1N, value=-lr / (1 - beta1**step))
        return plan_GMN(alpha_G1N).transpose(1, 2)


class SparsityConstrainedRouter(SinkhornRouter):
    """Sparsity-constrained expert choice (Liu et al. 2024, "Routers in Vision MoE"): each expert takes its top-C
    tokens on a transport plan of the softmax gates whose expert columns have at most C non-zeros. The token-choice
    twin solves the transposed problem (at most K experts per token) and takes the top-K per token. No noise and
    no auxiliary loss; combine weights are the softmax of the logits, as for Sinkhorn."""

    @property
    def sigma(self) -> float:
        """No noise on the logits: the transport plan balances the experts."""
        return 0.0

    def transport(self, logits_GSE: Tensor, capacity_: int) -> Tensor:
        """Tokens (mass 1) onto experts (mass S/E): each expert's column k-sparse with k = C, or, for token choice,
        each token's row with k = K (the transposed problem).  [G, S, E]"""
        S, E = logits_GSE.shape[1:]
        gates_GSE = expert_softmax(logits_GSE)
        if self.cfg.kind.choice == "expert":
            return sparsity_constrained_transport(gates_GSE, capacity_, row_mass=1.0, column_mass=S / E)
        gates_GES = gates_GSE.transpose(1, 2)
        transport_GES = sparsity_constrained_transport(gates_GES, self.cfg.k, row_mass=S / E, column_mass=1.0)
        return transport_GES.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- per image


class PerImageRouter(LinearRouter):
    """Mobile V-MoE's router (Daxberger et al. 2023): logits `[B, E]` from each image's mean token, computed once
    before the first MoE block and reused by all of them; the importance loss keeps images spread over experts."""

    def forward(self, x_BND: Tensor) -> tuple[Tensor, Tensor]:
        _, logits_B1E = self.logits(x_BND.mean(dim=1, keepdim=True))
        logits_BE = logits_B1E.squeeze(1)
        aux = self.cfg.importance_weight * importance_loss(logits_BE.softmax(dim=-1).unsqueeze(0))
        return logits_BE, aux


class ImageChoiceRouter(nn.Module):
    """An MoE block's router under per-image routing: every token takes its image's top-K experts and gates.

    It has no weights: the decision is the model's `PerImageRouter`'s. Slots are handed out as token choice does
    (all first choices before any second; BPR by the image's top-1 gate, a stable sort, so an image's tokens stay
    together), so a full expert drops whole images' tokens. The aux loss is the image router's, counted once.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x_GSD: Tensor, image_logits_BE: Tensor | None = None) -> RouterOutput:
        if image_logits_BE is None:
            raise ValueError("per-image routing needs the model's image logits: run the block inside the model")
        G, S, _ = x_GSD.shape
        cfg = self.cfg
        tokens_per_image = G * S // image_logits_BE.shape[0]
        gates_BE = image_logits_BE.softmax(dim=-1)
        gates_GSE = gates_BE.repeat_interleave(tokens_per_image, dim=0).view(G, S, cfg.num_experts)
        plan = token_choice_plan(gates_GSE, cfg.k, group_capacity(cfg, S), cfg.bpr)
        zero = image_logits_BE.new_zeros(())
        return RouterOutput(plan, zero, lambda: _token_choice_metrics(plan), image_logits_BE[None])


# ---------------------------------------------------------------------------------------------------- by kind

ROUTERS: dict[str, type[nn.Module]] = {  # every kind that places tokens (Soft MoE: models/moe.py, SoftMoEMlp)
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
    "sinkhorn_token_choice": SinkhornRouter,
    "sinkhorn_expert_choice": SinkhornRouter,
    "sparsity_constrained": SparsityConstrainedRouter,
    "sparsity_constrained_token_choice": SparsityConstrainedRouter,
    "per_image": ImageChoiceRouter,
}


def make_router(dim: int, cfg: MoEConfig) -> nn.Module:
    """The router of an MoE block for `cfg.router`; an error for a kind that has none (Soft MoE) or is unknown."""
    if cfg.router not in ROUTERS:
        raise ValueError(f"no token router for router kind {cfg.router!r}; routers: {', '.join(ROUTERS)}")
    return ROUTERS[cfg.router](dim, cfg)
