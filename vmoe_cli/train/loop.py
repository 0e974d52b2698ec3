"""One training loop for pretrain and finetune: train step, log, evaluate, checkpoint, until `train.steps`.

Accelerate owns devices, processes, mixed precision and gradient accumulation; `prepare()` sees the
model, optimiser and scheduler only, never the loader, which is already split per rank (DESIGN.md
section 4). Determinism: before every step the global torch RNG (router noise, dropout) and the mixup
generator are reseeded from (seed, step, rank), and the loader resumes at (epoch, batch), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from vmoe_cli.checkpoint import (
    checkpoint_dir,
    find_resume,
    load_recipe_of,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from vmoe_cli.config import DataConfig, Recipe, TrainConfig, dump_recipe, recipe_to_dict
from vmoe_cli.data.augment import mixup
from vmoe_cli.data.loader import Loader, build_loader
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import ModelOutput, VisionTransformer
from vmoe_cli.train.distributed import forward_passes, full_states, load_optimizer_state, make_accelerator
from vmoe_cli.train.optim import build_optimizer, build_scheduler, freeze
from vmoe_cli.train.report import Reporter


def pretrain(recipe: Recipe, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train a freshly initialised model of `recipe` into run directory `out_dir`; the final eval record."""
    return train(recipe, Path(out_dir), resume)


def train(recipe: Recipe, run_dir: Path, resume: str | None, model: VisionTransformer | None = None) -> dict[str, Any]:
    """The loop. `model` (finetune) replaces the recipe's freshly initialised one; resume restores everything."""
    data, cfg = _sections(recipe)
    accelerator = make_accelerator(cfg)
    micro = _micro_batch(cfg, accelerator.num_processes)
    ckpt = find_resume(run_dir, resume) if resume else None
    if ckpt is None and (checkpoint_dir(run_dir) / "last").exists():
        raise VmoeError(f"{run_dir} already has checkpoints: add --resume latest, or choose another --out")
    _seed_everything(cfg.seed)
    model = model or VisionTransformer(recipe.model)
    freeze(model, cfg.freeze)

    def loader(epoch: int, start: int) -> Loader:
        return _train_loader(data, cfg, recipe, micro, accelerator, epoch, start)

    total = cfg.steps or math.ceil(cfg.epochs * loader(0, 0).steps / cfg.grad_accum)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total, cfg)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt is not None:
        _check_same_model(recipe, ckpt)
        model.load_state_dict(load_weights(ckpt))
        state = load_train_state(ckpt)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ckpt is not None:
        load_optimizer_state(model, optimizer, state["optimizer"], accelerator)
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])  # fp16 loss scale
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "config.yaml")
    accelerator.wait_for_everyone()

    step_model = _compiled(model, accelerator) if cfg.compile else model  # evaluation and checkpoints: `model`
    step, stream = state["step"], Batches(loader, state["epoch"], state["batch"])
    reporter = Reporter(run_dir, accelerator.is_main_process, total, step, cfg.tensorboard)
    spread = "FSDP2" if accelerator.is_fsdp2 else "DDP" if accelerator.num_processes > 1 else "1 process"
    reporter.note(f"{accelerator.num_processes} x {accelerator.device.type}, {spread}; steps {step} -> {total}")
    result: dict[str, Any] = {}
    try:
        while step < total:
            log = (step + 1) % cfg.log_every == 0 or step + 1 == total
            record = train_step(step, step_model, optimizer, scheduler, stream, accelerator, cfg, data, log)
            step += 1
            if record is not None:
                reporter.train(_to_json(record), cfg.batch_size)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                result = {"step": step, **evaluate(accelerator.unwrap_model(model), data, recipe, micro, accelerator)}
                reporter.eval(result)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total:
                checkpoint(run_dir, step, model, optimizer, scheduler, stream, recipe, accelerator)
    finally:
        reporter.close()
    return result


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


def train_step(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stream: Batches,
    accelerator: Accelerator,
    cfg: TrainConfig,
    data: DataConfig,
    log: bool,
) -> dict[str, Any] | None:
    """One optimiser step over `grad_accum` micro-batches; with `log`, returns the step's metrics as tensors.

    Without `log` nothing is reduced across ranks and the routing metrics are never computed.
    """
    seed = random.Random(f"step:{cfg.seed}:{step}:{accelerator.process_index}").getrandbits(63)
    torch.manual_seed(seed)  # router noise and dropout depend on (seed, step, rank) only
    generator = torch.Generator().manual_seed(seed)  # mixup
    model.train()
    losses, aux_losses = [], []
    for _ in range(cfg.grad_accum):
        images, labels = stream.next()
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        targets = F.one_hot(labels, accelerator.unwrap_model(model).cfg.num_classes).float()
        targets = targets * (1 - cfg.label_smoothing) + cfg.label_smoothing / targets.shape[-1]
        if data.augment.mixup > 0:
            images, targets = mixup(images, targets, data.augment.mixup, generator)
        with accelerator.accumulate(model):
            out: ModelOutput = model(images, labels)  # labels: the per-image router's super-class guidance
            loss = task_loss(out.logits.float(), targets, cfg.loss)
            _check_finite(loss + out.aux_loss, step, accelerator)
            accelerator.backward(loss + out.aux_loss)
            if accelerator.sync_gradients and cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach())
        aux_losses.append(out.aux_loss.detach())
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    if not log:
        return None
    record: dict[str, Any] = {"step": step + 1, "epoch": stream.epoch, "lr": lr}
    record["loss"] = accelerator.reduce(torch.stack(losses).mean(), "mean")
    record["aux_loss"] = torch.stack(aux_losses).mean()
    for block, route in out.routing.items():  # this rank's last micro-batch
        record.update({f"moe{block}/{name}": value for name, value in route.metrics.items()})
    return record


def task_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax cross-entropy, or sigmoid BCE summed over classes (big_vision), both on soft targets."""
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def evaluate(
    model: VisionTransformer, data: DataConfig, recipe: Recipe, batch_size: int, accelerator: Accelerator
) -> dict[str, Any]:
    """Top-1 over the whole eval split: each rank counts its part, one reduce at the end."""
    loader = build_loader(
        data.shards, data.eval_split, data, batch_size=batch_size, image_size=recipe.model.image_size,
        channels=recipe.model.channels, train=False, rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )  # fmt: skip
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=accelerator.device)  # correct, total
    for images, labels in loader:
        logits = model(images.to(accelerator.device)).logits
        counts[0] += (logits.argmax(-1) == labels.to(accelerator.device)).sum()
        counts[1] += labels.numel()
    for _ in range(forward_passes(len(loader), accelerator) - len(loader)):  # FSDP: match the other ranks
        model(torch.zeros(1, recipe.model.channels, recipe.model.image_size, recipe.model.image_size,
                          device=accelerator.device))  # fmt: skip
    correct, total = accelerator.reduce(counts, "sum").tolist()
    return {"eval_top1": correct / max(total, 1), "eval_correct": correct, "eval_total": total}


def checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stream: Batches,
    recipe: Recipe,
    accelerator: Accelerator,
) -> None:
    """Save weights, recipe and resumable state from rank 0, with every rank waiting around it."""
    accelerator.wait_for_everyone()
    weights, optimizer_state = full_states(model, optimizer, accelerator)  # every rank: FSDP gathers
    if accelerator.is_main_process:
        state = {
            "step": step,
            "epoch": stream.epoch,
            "batch": stream.batch,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()  # fp16: the dynamic loss scale
        save_checkpoint(run_dir, step, weights, recipe, state, recipe.train.keep_last)
    accelerator.wait_for_everyone()


def _sections(recipe: Recipe) -> tuple[DataConfig, TrainConfig]:
    if recipe.data is None or not recipe.data.shards:
        raise VmoeError("the recipe needs a data: section with data.shards (a directory from `vmoe shard`)")
    if recipe.train is None:
        raise VmoeError("the recipe needs a train: section (train.steps or train.epochs at least)")
    return recipe.data, recipe.train


def _micro_batch(cfg: TrainConfig, processes: int) -> int:
    """Images per process per micro-batch: batch_size split over processes and accumulation."""
    parts = processes * cfg.grad_accum
    if cfg.batch_size % parts:
        raise VmoeError(f"train.batch_size={cfg.batch_size} is not divisible by processes x grad_accum = {parts}")
    return cfg.batch_size // parts


def _train_loader(
    data: DataConfig, cfg: TrainConfig, recipe: Recipe, micro: int, accelerator: Accelerator, epoch: int, start: int
) -> Loader:
    return build_loader(
        data.shards, data.train_split, data, batch_size=micro, image_size=recipe.model.image_size,
        channels=recipe.model.channels, train=True, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=cfg.seed, epoch=epoch, start_batch=start,
    )  # fmt: skip


def _compiled(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The model under torch.compile, shapes fixed (train micro-batches all have one size); same parameters."""
    if accelerator.device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++"))):
        raise VmoeError("train.compile needs a C++ compiler on CPU (none found: install g++, or set CXX); "
                        "or set train.compile=false")  # fmt: skip
    return torch.compile(model, dynamic=False)


def _check_finite(loss: torch.Tensor, step: int, accelerator: Accelerator) -> None:
    """Stop every rank with one line when any rank's loss is NaN or infinite (before the update)."""
    bad = accelerator.reduce((~torch.isfinite(loss.detach())).float(), "sum")
    if bad.item():
        raise VmoeError(
            f"step {step + 1}: the loss is not finite ({loss.item()}); stopped, the last good checkpoint is kept "
            "(lower train.lr or raise train.warmup_steps, then --resume latest)"
        )


def _check_same_model(recipe: Recipe, ckpt: Path) -> None:
    if recipe_to_dict(load_recipe_of(ckpt))["model"] != recipe_to_dict(recipe)["model"]:
        raise VmoeError(f"{ckpt}: its model: section differs from the recipe's; resume with the same model")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _to_json(record: dict[str, Any]) -> dict[str, Any]:
    """Tensors to numbers and lists, so the record is one JSON line."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
