"""How the model is spread over processes: DDP (the default) or FSDP2 (`train.fsdp`), behind one interface.

DDP keeps a full replica per process. Every parameter takes part in every step (experts run over their whole
fixed-size buffers, filled or not), so DDP need not search the graph for unused ones. With expert parallelism
(train/expert_parallel.py) the expert parameters are hidden from DDP and reduced over their own group.

FSDP2 shards parameters, gradients and optimizer state over the processes (each encoder block is one unit), for
models that do not fit one GPU. Under FSDP every forward gathers
parameters from all ranks, so every rank must run the same number of forward passes (evaluation pads),
and full weights / optimizer state for a checkpoint are gathered collectively, then written by rank 0.

Accelerate turns FSDP on for accelerators only; for CPU processes (gloo, used by the tests) it would fall
back to DDP without a word, so `make_accelerator` sets the distributed type itself there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from vmoe_cli.config import TrainConfig
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.expert_parallel import (
    ExpertParallel,
    gather_optimizer_state,
    gather_weights,
    slice_optimizer_state,
)

EXPERTS = r"blocks\.\d+\.mlp\.experts"  # module names of the stacked experts (models/vit.py, models/moe.py)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator: precision, accumulation, and DDP or (with `cfg.fsdp`) FSDP2 over blocks.

    Accelerate keeps one state per process; it is reset here so that a second run in the same process (a
    notebook, the tests) may change precision or sharding. The process group (PartialState) is kept.
    """
    AcceleratorState._reset_state()
    process = PartialState._shared_state  # read, not PartialState(): that would initialise it without our flags
    if process.get("distributed_type") == DistributedType.FSDP:  # set below by an earlier run on CPU
        process["distributed_type"] = DistributedType.MULTI_CPU
    common = {
        "mixed_precision": cfg.mixed_precision,
        "gradient_accumulation_steps": cfg.grad_accum,
        "step_scheduler_with_optimizer": False,  # stepped once per optimiser step, not once per process
    }
    if not cfg.fsdp:
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
        return _launched_as_seen(Accelerator(**common, kwargs_handlers=[ddp]))
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        ignored_modules=EXPERTS if cfg.expert_parallel > 1 else None,  # sharded by expert parallelism instead
    )  # fmt: skip
    accelerator = _launched_as_seen(Accelerator(**common, fsdp_plugin=plugin))
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState copies it from here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _launched_as_seen(accelerator: Accelerator) -> Accelerator:
    """The accelerator, unless the launcher started more processes than it joined: each would then train alone
    into the same run directory (a CPU launch without ACCELERATE_USE_CPU=1 falls back to one process each)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise VmoeError(
            f"launched as {launched} processes, but Accelerate joined {accelerator.num_processes}; on CPU set "
            "ACCELERATE_USE_CPU=1 (torchrun, or accelerate launch --multi_gpu)"
        )
    return accelerator


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator, xp: ExpertParallel | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model weights and optimizer state on rank 0, full `[E, ...]` experts (collective under FSDP or
    expert parallelism: call on every rank)."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_fsdp2:
        weights = accelerator.get_state_dict(model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        weights, state = unwrapped.state_dict(), optimizer.state_dict()
    if xp is None:
        return weights, state
    weights = {**weights, **gather_weights(unwrapped, xp)}
    return weights, gather_optimizer_state(state, optimizer, unwrapped, xp)


def load_optimizer_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    accelerator: Accelerator,
    xp: ExpertParallel | None,
) -> None:
    """Restore the optimizer state written by `full_states` into the prepared optimizer (experts sliced)."""
    if xp is not None:
        state = slice_optimizer_state(state, optimizer, accelerator.unwrap_model(model), xp)
    if accelerator.is_fsdp2:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def forward_passes(steps: int, accelerator: Accelerator, xp: ExpertParallel | None) -> int:
    """How many evaluation forward passes this rank runs: its own `steps`, or under FSDP or expert parallelism
    (whose forward passes are collectives) the most of any rank."""
    if not accelerator.is_fsdp2 and xp is None:
        return steps
    return int(accelerator.reduce(torch.tensor(steps, device=accelerator.device), "max"))
