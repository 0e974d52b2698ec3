"""How the model is spread over processes: DDP (the default) or FSDP2 (`train.fsdp`), behind one interface.

DDP keeps a full replica per process; MoE experts that get no tokens on a step have no gradient, hence
`find_unused_parameters=True`. FSDP2 shards parameters, gradients and optimizer state over the processes
(each encoder block is one unit), for models that do not fit one GPU. Under FSDP every forward gathers
parameters from all ranks, so every rank must run the same number of forward passes (evaluation pads),
and full weights / optimizer state for a checkpoint are gathered collectively, then written by rank 0.

Accelerate turns FSDP on for accelerators only; for CPU processes (gloo, used by the tests) it would fall
back to DDP without a word, so `make_accelerator` sets the distributed type itself there.
"""

from __future__ import annotations

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
        return Accelerator(**common, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
    )  # fmt: skip
    accelerator = Accelerator(**common, fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState copies it from here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model weights and optimizer state on rank 0 (collective under FSDP: call on every rank)."""
    if accelerator.is_fsdp2:
        weights = accelerator.get_state_dict(model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return weights, get_optimizer_state_dict(model, optimizer, options=options)
    return accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], accelerator: Accelerator
) -> None:
    """Restore the optimizer state written by `full_states` into the prepared optimizer."""
    if accelerator.is_fsdp2:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def forward_passes(steps: int, accelerator: Accelerator) -> int:
    """How many evaluation forward passes this rank runs: its own `steps`, or under FSDP the most of any rank."""
    if not accelerator.is_fsdp2:
        return steps
    return int(accelerator.reduce(torch.tensor(steps, device=accelerator.device), "max"))
