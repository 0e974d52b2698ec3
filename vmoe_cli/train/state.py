"""What a training run holds: its fixed parts (`Run`), its resumable state (`TrainState`), its batches (`Batches`).

`TrainState` is everything a checkpoint's training state (checkpoint.py: JSON + safetensors) stores besides the
weights and the recipe: the step, the loader position (epoch, batch), the optimiser, schedule, RNG and fp16
loss-scale states. It is written as a plain dict with those keys (the `scaler` key only under fp16), numpy's RNG
key array as a list, so that it holds only plain values and tensors; older run directories (train_state.pt,
that array as an ndarray) resume too. A stored state is checked when loaded: a one-line error, never a traceback.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from vmoe_cli.checkpoint import load_train_state
from vmoe_cli.config import Recipe, TrainConfig
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import Loader
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.distributed import load_optimizer_state
from vmoe_cli.train.expert_parallel import ExpertParallel
from vmoe_cli.train.losses import SuperclassGuidance


@dataclass
class Run:
    """A run's fixed parts: the recipe and its sections, the prepared model, optimiser and schedule."""

    recipe: Recipe
    data: DataConfig
    cfg: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP or FSDP): evaluation and checkpoints
    step_model: torch.nn.Module  # `model`, or it under torch.compile: train steps
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Callable[[int, int], Loader]  # this rank's train loader at (epoch, first batch)
    micro: int  # images per process per micro-batch
    total: int  # optimiser steps of the whole run
    guidance: SuperclassGuidance | None  # the per-image router's super-class guidance, when the recipe has one
    xp: ExpertParallel | None  # where this rank stands under expert parallelism (train.expert_parallel > 1)


class Batches:
    """Micro-batches across epochs; (epoch, batch) is the position of the next one, what checkpoints store."""

    def __init__(self, make_loader: Callable[[int, int], Loader], epoch: int, batch: int):
        self.make_loader, self.epoch, self.batch = make_loader, epoch, batch
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._it = iter(self.make_loader(self.epoch, self.batch))
            item = next(self._it, None)
            if item is not None:
                self.batch += 1
                return item
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None


@dataclass
class TrainState:
    """The resumable state after `step` optimiser steps; a fresh run starts from the defaults."""

    step: int = 0
    epoch: int = 0  # the loader position of the next micro-batch
    batch: int = 0
    optimizer: dict[str, Any] | None = None  # full (unsharded) state, as `full_states` gathers it
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # python, numpy and torch global generators
    scaler: dict[str, Any] | None = None  # fp16: the dynamic loss scale

    @classmethod
    def capture(cls, run: Run, stream: Batches, step: int, optimizer: dict[str, Any]) -> TrainState:
        """The state now, with `optimizer` the full optimiser state (gathered on every rank beforehand)."""
        scaler = run.accelerator.scaler
        return cls(
            step=step,
            epoch=stream.epoch,
            batch=stream.batch,
            optimizer=optimizer,
            scheduler=run.scheduler.state_dict(),
            rng={"python": random.getstate(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state()},
            scaler=scaler.state_dict() if scaler is not None else None,
        )

    @classmethod
    def load(cls, ckpt: Path) -> TrainState:
        """The state stored in checkpoint directory `ckpt`; one line naming it when that is no state of this loop."""
        return cls(**_checked(load_train_state(ckpt), ckpt))

    def to_dict(self) -> dict[str, Any]:
        """What the checkpoint stores: the fields, `scaler` only when there is one."""
        state = dict(vars(self))  # shallow: the optimiser's tensors are not copied
        if state["scaler"] is None:
            del state["scaler"]
        return state

    def restore(self, run: Run) -> None:
        """Put the optimiser, schedule, RNG and loss-scale states into the prepared `run` (every rank)."""
        try:
            load_optimizer_state(run.model, run.optimizer, self.optimizer, run.accelerator, run.xp)
            run.scheduler.load_state_dict(self.scheduler)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise VmoeError(
                f"--resume: the checkpoint's optimiser or schedule state does not fit this run ({_first_line(e)}); "
                "resume with the train: settings it was written with"
            ) from None
        python, numpy_state, torch_state = _rng_states(self.rng)
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if run.accelerator.scaler is not None and self.scaler is not None:
            run.accelerator.scaler.load_state_dict(self.scaler)


def _numpy_rng_state() -> tuple[Any, ...]:
    """numpy's global generator state, its key array as a list of ints (plain values only)."""
    name, keys, *rest = np.random.get_state()
    return (name, keys.tolist(), *rest)


def _rng_states(rng: dict[str, Any]) -> tuple[Any, Any, torch.Tensor]:
    """The stored python, numpy and torch generator states in the forms their set-state functions take."""
    name, keys, *rest = rng["numpy"]
    return rng["python"], (name, np.asarray(keys, dtype=np.uint32), *rest), rng["torch"]


def _checked(state: Any, ckpt: Path) -> dict[str, Any]:
    """`state` when it has the fields, types and generator states `TrainState.to_dict` writes."""
    if isinstance(state, dict) and "converted_from" in state:
        raise VmoeError(
            f"{ckpt}: written by `vmoe convert-jax`, it has no training state to resume; train from its weights "
            f"with `vmoe finetune RECIPE --from {ckpt}`"
        )
    names = {f.name for f in fields(TrainState)}
    plain = isinstance(state, dict) and names - {"scaler"} <= state.keys() <= names
    plain = plain and all(type(state[k]) is int and state[k] >= 0 for k in ("step", "epoch", "batch"))
    plain = plain and all(isinstance(state.get(k, {}), dict) for k in ("optimizer", "scheduler", "scaler", "rng"))
    if not plain:
        raise VmoeError(f"{ckpt}: its training state lacks or mistypes the fields vmoe writes; {_elsewhere(ckpt)}")
    try:
        python, numpy_state, torch_state = _rng_states(state["rng"])
        random.Random().setstate(python)
        np.random.RandomState().set_state(numpy_state)
        torch.Generator().set_state(torch_state)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise VmoeError(
            f"{ckpt}: its training state's random-generator states are damaged ({_first_line(e)}); {_elsewhere(ckpt)}"
        ) from None
    return state


def _elsewhere(ckpt: Path) -> str:
    """How to go on from a checkpoint whose training state cannot be resumed."""
    return (
        f"pass --resume PATH of another checkpoint, or train from its weights with `vmoe finetune RECIPE --from {ckpt}`"
    )


def _first_line(error: Exception) -> str:
    """An exception in a few words, for a one-line message."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
