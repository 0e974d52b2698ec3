"""One training loop for pretrain and finetune: train step, log, evaluate, checkpoint, until `train.steps`.

Accelerate owns devices, processes, mixed precision and gradient accumulation; `prepare()` sees the
model, optimiser and scheduler only, never the loader, which is already split per rank
(data/loader.py). Determinism: before every step the global torch RNG (router noise, dropout) and the mixup
generator are reseeded from (seed, step, rank), and the loader resumes at (epoch, batch), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes. What a checkpoint restores
(`TrainState`) and the run's fixed parts (`Run`) are in state.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from vmoe_cli.checkpoint import checkpoint_dir, find_resume, load_recipe_of, load_weights, save_checkpoint
from vmoe_cli.config import Recipe, TrainConfig, dump_recipe, recipe_to_dict
from vmoe_cli.data.augment import mixup
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import Loader, build_loader
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import ModelOutput, VisionTransformer
from vmoe_cli.outputs import run_lock
from vmoe_cli.progress import Display, ProgressFn
from vmoe_cli.train.distributed import forward_passes, full_states, make_accelerator
from vmoe_cli.train.expert_parallel import (
    ExpertParallel,
    clip_grad_norm,
    expert_parallel,
    reduce_expert_grads,
    shard_model,
)
from vmoe_cli.train.losses import superclass_guidance, task_loss
from vmoe_cli.train.optim import build_optimizer, build_scheduler, freeze, warmup_steps
from vmoe_cli.train.report import Reporter
from vmoe_cli.train.state import Batches, Run, TrainState


def pretrain(recipe: Recipe, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train a freshly initialised model of `recipe` into run directory `out_dir`; the final eval record."""
    return train(recipe, Path(out_dir), resume)


def train(recipe: Recipe, run_dir: Path, resume: str | None, model: VisionTransformer | None = None) -> dict[str, Any]:
    """The loop. `model` (finetune) replaces the recipe's freshly initialised one; resume restores everything.

    The main process (global rank 0, the only one writing `run_dir`) holds `run_dir`'s lock throughout.
    """
    main = int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch; the Accelerator comes later
    with run_lock(run_dir) if main else contextlib.nullcontext(), Display() as display:
        return _train(recipe, run_dir, resume, model, display if main else None)


def _train(
    recipe: Recipe, run_dir: Path, resume: str | None, model: VisionTransformer | None, display: Display | None
) -> dict[str, Any]:
    ckpt = _resume_from(recipe, run_dir, resume)
    run = _setup(recipe, run_dir, model, ckpt, display)
    state = TrainState.load(ckpt) if ckpt is not None else TrainState()
    if ckpt is not None:
        state.restore(run)
    cfg, step, stream = run.cfg, state.step, Batches(run.loader, state.epoch, state.batch)
    reporter = Reporter(run_dir, run.accelerator.is_main_process, run.total, step, cfg.tensorboard, display)
    _notes(run, step, reporter)
    result: dict[str, Any] = {}
    try:
        while step < run.total:
            log = (step + 1) % cfg.log_every == 0 or step + 1 == run.total
            record = train_step(run, stream, step, log)
            step += 1
            if record is not None:
                reporter.train(_to_json(record), cfg.batch_size)
            reporter.step(step)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == run.total:
                result = {"step": step, **evaluate(run, display)}
                reporter.eval(result)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == run.total:
                checkpoint(run, stream, step)
    finally:
        reporter.close()
    return result


def train_step(run: Run, stream: Batches, step: int, log: bool) -> dict[str, Any] | None:
    """One optimiser step over `grad_accum` micro-batches; with `log`, returns the step's metrics as tensors.

    Without `log` nothing is reduced across ranks and the routing metrics are never computed.
    """
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.step_model, run.optimizer
    seed = random.Random(f"step:{cfg.seed}:{step}:{accelerator.process_index}").getrandbits(63)
    torch.manual_seed(seed)  # router noise and dropout depend on (seed, step, rank) only
    generator = torch.Generator().manual_seed(seed)  # mixup
    model.train()
    losses, aux_losses = [], []
    for _ in range(cfg.grad_accum):
        images, labels = stream.next()
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        targets = F.one_hot(labels, run.recipe.model.num_classes).float()
        targets = targets * (1 - cfg.label_smoothing) + cfg.label_smoothing / targets.shape[-1]
        if run.data.augment.mixup > 0:
            images, targets = mixup(images, targets, run.data.augment.mixup, generator)
        with accelerator.accumulate(model):
            out: ModelOutput = model(images)
            loss = task_loss(out.logits.float(), targets, cfg.loss)
            aux = out.aux_loss if run.guidance is None else out.aux_loss + run.guidance.weighted(out, labels)
            _check_finite(loss + aux, step, accelerator)
            accelerator.backward(loss + aux)
            if accelerator.sync_gradients:
                _finish_gradients(run)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach())
        aux_losses.append(aux.detach())
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    if not log:
        return None
    record: dict[str, Any] = {"step": step + 1, "epoch": stream.epoch, "lr": lr}
    record["loss"] = accelerator.reduce(torch.stack(losses).mean(), "mean")
    record["aux_loss"] = torch.stack(aux_losses).mean()
    for block, route in out.routing.items():  # this rank's last micro-batch
        record.update({f"moe{block}/{name}": value for name, value in route.metrics.items()})
    if run.guidance is not None:  # logged with the block where the image router decides
        record.update({f"moe{min(out.routing)}/{k}": v for k, v in run.guidance.metrics(out, labels).items()})
    return record


@torch.no_grad()
def evaluate(run: Run, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Top-1 over the whole eval split: each rank counts its part, one reduce at the end. `progress` is told how
    a `data.cache` fill of the split goes."""
    accelerator, data, cfg = run.accelerator, run.data, run.recipe.model
    model = accelerator.unwrap_model(run.model).eval()
    loader = build_loader(
        data.shards, data.eval_split, data, batch_size=run.micro, image_size=cfg.image_size, channels=cfg.channels,
        train=False, rank=accelerator.process_index, world_size=accelerator.num_processes, progress=progress,
    )  # fmt: skip
    counts = torch.zeros(2, dtype=torch.int64, device=accelerator.device)  # correct, total
    for images, labels in loader:
        logits = model(images.to(accelerator.device)).logits
        counts[0] += (logits.argmax(-1) == labels.to(accelerator.device)).sum()
        counts[1] += labels.numel()
    for _ in range(forward_passes(len(loader), accelerator, run.xp) - len(loader)):  # collectives: match the others
        model(torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size, device=accelerator.device))
    correct, total = accelerator.reduce(counts, "sum").tolist()
    return {"eval_top1": correct / max(total, 1), "eval_correct": correct, "eval_total": total}


def _finish_gradients(run: Run) -> None:
    """Before the update: expert gradients reduced over their peers (DDP did the rest), then clipped."""
    if run.xp is not None:
        reduce_expert_grads(run.model, run.xp)
    if not run.cfg.grad_clip:
        return
    if run.xp is None:
        run.accelerator.clip_grad_norm_(run.step_model.parameters(), run.cfg.grad_clip)
    else:
        run.accelerator.unscale_gradients()
        clip_grad_norm(run.model, run.cfg.grad_clip, run.xp)


def checkpoint(run: Run, stream: Batches, step: int) -> None:
    """Save weights, recipe and resumable state from rank 0, with every rank waiting around it."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    weights, optimizer_state = full_states(run.model, run.optimizer, accelerator, run.xp)  # every rank: gathers
    if accelerator.is_main_process:
        state = TrainState.capture(run, stream, step, optimizer_state)
        save_checkpoint(run.run_dir, step, weights, run.recipe, state.to_dict(), run.cfg.keep_last)
    accelerator.wait_for_everyone()


def _resume_from(recipe: Recipe, run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (None: start); a run directory with checkpoints needs --resume."""
    ckpt = find_resume(run_dir, resume) if resume else None
    if ckpt is None and (checkpoint_dir(run_dir) / "last").exists():
        raise VmoeError(f"{run_dir} already has checkpoints: add --resume latest, or choose another --out")
    if ckpt is not None:
        _check_same_model(recipe, ckpt)
    return ckpt


def _setup(
    recipe: Recipe, run_dir: Path, model: VisionTransformer | None, ckpt: Path | None, progress: ProgressFn | None
) -> Run:
    """Accelerator, model (`ckpt`'s weights when resuming), optimiser and schedule, prepared; the run directory.
    `progress` is told how a `data.cache` fill of the train split goes."""
    data, cfg = _sections(recipe)
    accelerator = make_accelerator(cfg)
    micro = _micro_batch(cfg, accelerator.num_processes)
    _seed_everything(cfg.seed)
    model = model or VisionTransformer(recipe.model)
    freeze(model, cfg.freeze)
    if ckpt is not None:
        model.load_state_dict(load_weights(ckpt))  # full [E, ...] experts, whatever N wrote them
    xp = _expert_layout(recipe, accelerator)
    if xp is not None:
        shard_model(model, xp)
    loader = _train_loaders(recipe, micro, accelerator, progress)
    total = cfg.steps or math.ceil(cfg.epochs * loader(0, 0).steps / cfg.grad_accum)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, total, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    step_model = _compiled(model, accelerator) if cfg.compile else model
    guidance = superclass_guidance(recipe.model.moe, accelerator.device)
    return Run(
        recipe, data, cfg, run_dir, accelerator, model, step_model, optimizer, scheduler, loader, micro, total,
        guidance, xp,
    )  # fmt: skip


def _expert_layout(recipe: Recipe, accelerator: Accelerator) -> ExpertParallel | None:
    """The run's expert-parallel layout (None without it); every rank creates the process groups."""
    n = recipe.train.expert_parallel
    num_experts = None if recipe.model.moe is None else recipe.model.moe.num_experts
    return expert_parallel(n, num_experts, accelerator.num_processes, accelerator.process_index)


def _notes(run: Run, step: int, reporter: Reporter) -> None:
    """The run's opening lines: how it is spread over processes, and a warmup cut short to fit the run."""
    accelerator = run.accelerator
    spread = "FSDP2" if accelerator.is_fsdp2 else "DDP" if accelerator.num_processes > 1 else "1 process"
    if run.xp is not None:
        spread += f", {run.xp.layout}"
    reporter.note(f"{accelerator.num_processes} x {accelerator.device.type}, {spread}; steps {step} -> {run.total}")
    warmup = warmup_steps(run.total, run.cfg)
    if warmup < run.cfg.warmup_steps:
        reporter.note(f"train.warmup_steps={run.cfg.warmup_steps} capped to {warmup}, half of the {run.total} steps")


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


def _train_loaders(
    recipe: Recipe, micro: int, accelerator: Accelerator, progress: ProgressFn | None
) -> Callable[[int, int], Loader]:
    """This rank's train loader of any (epoch, first batch); `progress` hears of a `data.cache` fill."""
    data, cfg, model = recipe.data, recipe.train, recipe.model

    def loader(epoch: int, start: int) -> Loader:
        return build_loader(
            data.shards, data.train_split, data, batch_size=micro, image_size=model.image_size,
            channels=model.channels, train=True, rank=accelerator.process_index,
            world_size=accelerator.num_processes, seed=cfg.seed, epoch=epoch, start_batch=start, progress=progress,
        )  # fmt: skip

    return loader


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


def _to_json(record: dict[str, Any]) -> dict[str, Any]:
    """Tensors to numbers and lists, so the record is one JSON line."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
