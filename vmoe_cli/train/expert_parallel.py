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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

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
    """Clip all gradients by their global norm, as on one process: FSDP2's shards summed over all ranks, this
    rank's experts over the replica (DDP's gradients are the same on every rank)."""
    experts = {id(p) for p in _expert_parameters(model)}
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]
    device = grads[0][0].device
    squares = {kind: torch.zeros((), device=device) for kind in ("replicated", "sharded", "expert")}
    for grad, expert in grads:
        kind = "expert" if expert else "sharded" if isinstance(grad, DTensor) else "replicated"
        squares[kind] += _local(grad).float().square().sum()
    dist.all_reduce(squares["sharded"])  # FSDP2 shards over every rank
    dist.all_reduce(squares["expert"], group=xp.replica.group)  # this rank holds 1/N of the experts
    total = sum(squares.values()).sqrt()
    torch._foreach_mul_([_local(grad) for grad, _ in grads], (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: an FSDP2 shard, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_weights(model: nn.Module, xp: ExpertParallel) -> dict[str, torch.Tensor]:
    """The full `[E, ...]` expert tensors from every rank's slices, by name (collective: every rank calls it)."""
    return {name: _gather(p.detach(), xp) for name, p in _named_expert_parameters(model)}


def gather_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                           xp: ExpertParallel) -> dict[str, Any]:  # fmt: skip
    """A full optimiser state dict (keyed by position, or by name under FSDP2) with every expert parameter's
    tensors full `[E, ...]`, gathered from the live optimiser (collective: every rank calls it; under FSDP2 only
    rank 0's `state` holds anything)."""
    per_param = dict(state.get("state", {}))
    for key, (_, p) in zip(_expert_keys(state, optimizer, model), _named_expert_parameters(model), strict=True):
        per_param[key] = {
            k: _gather(v, xp) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in optimizer.state[p].items()
        }
    return {**state, "state": per_param}


def slice_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module,
                          xp: ExpertParallel) -> dict[str, Any]:  # fmt: skip
    """A full optimiser state cut to this rank's experts, for loading into the optimiser."""
    per_param = dict(state["state"])
    for key in _expert_keys(state, optimizer, model):
        if key in per_param:
            per_param[key] = {
                k: local_slice(v, xp.replica).clone() if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in per_param[key].items()
            }
    return {**state, "state": per_param}


def _named_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    names = set(expert_names(model))
    return [(name, p) for name, p in model.named_parameters() if name in names]


def _expert_keys(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> list[int | str]:
    """The state dict's keys of the expert parameters: names (FSDP2's state dicts) or positions over all groups."""
    named = _named_expert_parameters(model)
    if any(isinstance(key, str) for key in state.get("state", {})):
        return [name for name, _ in named]
    position = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    return [position[id(p)] for _, p in named]


def _gather(local_L: torch.Tensor, xp: ExpertParallel) -> torch.Tensor:
    """All ranks' slices of one expert tensor, in expert order.  [L, ...] -> [E, ...]"""
    parts = [torch.empty_like(local_L) for _ in range(xp.replica.size)]
    dist.all_gather(parts, local_L.contiguous(), group=xp.replica.group)
    return torch.cat(parts)
