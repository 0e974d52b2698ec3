"""Expert parallelism in training (`train.expert_parallel: N`): process groups, the sharded model, and the
expert gradients' own reduction.

W processes form W/N replicas of N consecutive ranks (so that a replica stays within a node where it can); each
rank of a replica holds E/N experts of every MoE layer and exchanges tokens with the other ranks of its replica
(models/expert_parallel.py). Non-expert parameters are reduced by DDP over all W ranks, as without expert
parallelism; expert parameters are hidden from DDP and reduced here, only over the W/N ranks that hold the same
experts. Checkpoints hold the full `[E, ...]` tensors: gathered on save, sliced on load, so a run saved at one N
resumes at any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vmoe_cli.errors import VmoeError
from vmoe_cli.models.expert_parallel import ExpertGroup, local_slice
from vmoe_cli.models.moe import Experts


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in the layout: its replica (the ranks it exchanges tokens with) and its expert peers."""

    replica: ExpertGroup  # the N ranks that together hold every expert once
    peers: dist.ProcessGroup  # the W/N ranks (one per replica) that hold the same experts as this rank
    world: int  # W

    @property
    def layout(self) -> str:
        """DP x EP, as the run's first line shows it."""
        return f"DP {self.world // self.replica.size} x EP {self.replica.size}"


def expert_parallel(n: int, num_experts: int | None, world: int, rank: int) -> ExpertParallel | None:
    """The layout of `n`-way expert parallelism over `world` processes (None for n = 1); one-line errors for
    layouts that cannot work. Every rank must call it: it creates the process groups collectively."""
    if n == 1:
        return None
    if num_experts is None:
        raise VmoeError(f"train.expert_parallel={n} needs a V-MoE: the recipe's model has no model.moe")
    if world % n:
        raise VmoeError(f"train.expert_parallel={n} does not divide the {world} processes; launch a multiple of {n}")
    if num_experts % n:
        raise VmoeError(f"train.expert_parallel={n} does not divide model.moe.num_experts={num_experts}")
    replicas = [dist.new_group(list(range(r * n, (r + 1) * n))) for r in range(world // n)]
    peers = [dist.new_group(list(range(i, world, n))) for i in range(n)]
    return ExpertParallel(ExpertGroup(replicas[rank // n], n, rank % n), peers[rank % n], world)


def expert_names(model: nn.Module) -> list[str]:
    """Names of the expert parameters (the stacked `[E, ...]` tensors of every MoE layer)."""
    return [
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, Experts)
        for name, _ in module.named_parameters(recurse=False)
    ]


def shard_model(model: nn.Module, xp: ExpertParallel) -> None:
    """Keep this rank's experts only, and hide them from DDP, which would average them over all W ranks."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.shard(xp.replica)
    model._ddp_params_and_buffers_to_ignore = expert_names(model)


def _expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, xp: ExpertParallel) -> None:
    """Average the expert gradients as DDP averages the others: a rank's expert gradient already sums what every
    rank of its replica sent; summed over the peers it covers all W ranks, divided by W it is their mean."""
    for p in _expert_parameters(model):
        if p.grad is not None:
            if xp.world > xp.replica.size:
                dist.all_reduce(p.grad, group=xp.peers)
            p.grad.div_(xp.world)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, xp: ExpertParallel) -> torch.Tensor:
    """Clip all gradients by their global norm, as on one process: the expert part is summed over the replica."""
    experts = {id(p) for p in _expert_parameters(model)}
    with_grad = [p for p in model.parameters() if p.grad is not None]
    shared = sum((p.grad.float().square().sum() for p in with_grad if id(p) not in experts), torch.zeros(()))
    expert = sum((p.grad.float().square().sum() for p in with_grad if id(p) in experts), torch.zeros(()))
    expert = expert.to(with_grad[0].grad.device)
    dist.all_reduce(expert, group=xp.replica.group)  # this rank's experts are 1/N of them
    total = (shared.to(expert.device) + expert).sqrt()
    torch._foreach_mul_([p.grad for p in with_grad], (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def gather_weights(weights: dict[str, torch.Tensor], xp: ExpertParallel, names: list[str]) -> dict[str, torch.Tensor]:
    """The full `[E, ...]` expert tensors from every rank's slices (collective: every rank calls it)."""
    return {name: _gather(w, xp) if name in names else w for name, w in weights.items()}


def gather_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                           xp: ExpertParallel) -> dict[str, Any]:  # fmt: skip
    """`optimizer.state_dict()` with every expert parameter's tensors full `[E, ...]` (collective). New entries:
    the state dict shares its per-parameter dicts with the live optimiser."""
    return _map_expert_state(state, optimizer, model, lambda value: _gather(value, xp))


def slice_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                          xp: ExpertParallel) -> dict[str, Any]:  # fmt: skip
    """A full optimiser state cut to this rank's experts, for `optimizer.load_state_dict`."""
    return _map_expert_state(state, optimizer, model, lambda value: local_slice(value, xp.replica).clone())


def _map_expert_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                      change: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:  # fmt: skip
    """A copy of `state` whose expert parameters' per-expert tensors (not the scalar step) went through `change`."""
    per_param = dict(state["state"])
    for index in _expert_indices(optimizer, model):
        if index in per_param:
            per_param[index] = {
                key: change(value) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in per_param[index].items()
            }
    return {**state, "state": per_param}


def _expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[int]:
    """The optimiser state's keys (positions over all param groups) of the expert parameters."""
    experts = {id(p) for p in _expert_parameters(model)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if id(p) in experts]


def _gather(local_L: torch.Tensor, xp: ExpertParallel) -> torch.Tensor:
    """All ranks' slices of one expert tensor, in expert order.  [L, ...] -> [E, ...]"""
    parts = [torch.empty_like(local_L) for _ in range(xp.replica.size)]
    dist.all_gather(parts, local_L.contiguous(), group=xp.replica.group)
    return torch.cat(parts)
