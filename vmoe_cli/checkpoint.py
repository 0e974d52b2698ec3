"""Checkpoints: model weights + resolved recipe + resumable training state, written atomically.

Layout of a run directory:
  RUN/checkpoints/step_00000300/model.safetensors   the model's state dict
  RUN/checkpoints/step_00000300/config.yaml         the resolved recipe (load_recipe reads it back)
  RUN/checkpoints/step_00000300/train_state.pt      whatever the train loop needs to resume (opaque here)
  RUN/checkpoints/last                              name of the newest complete checkpoint

A checkpoint is written into `.tmp-step_...` and renamed into place, then `last` is replaced
atomically, so a crash at any moment leaves only complete checkpoints behind. Train, eval and
convert all read checkpoints through this module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.config import Recipe, dump_recipe, load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import VisionTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAIN_STATE = "train_state.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    recipe: Recipe,
    train_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of `run_dir` (the model's full state dict `weights`) atomically, point `last` at
    it, prune to the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    tmp.mkdir()
    state = {k: v.detach().contiguous() for k, v in weights.items()}
    save_file(state, tmp / WEIGHTS)
    dump_recipe(recipe, tmp / CONFIG)
    torch.save(train_state, tmp / TRAIN_STATE)
    shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step
    os.replace(tmp, final)
    write_text_atomic(root / "last", name + "\n")
    for old in _complete(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory, from its name `step_XXXXXXXX`."""
    return int(Path(path).name.removeprefix("step_"))


def find_resume(run_dir: str | Path, which: str) -> Path:
    """The checkpoint to resume from: 'latest' (the one `RUN/checkpoints/last` names) or a path."""
    if which != "latest":
        path = Path(which)
        if not (path / WEIGHTS).is_file() or not (path / TRAIN_STATE).is_file():
            raise VmoeError(f"--resume {which}: not a complete checkpoint directory ({WEIGHTS}, {TRAIN_STATE})")
        return path
    last = checkpoint_dir(run_dir) / "last"
    if not last.is_file():
        raise VmoeError(f"{run_dir}: no checkpoint to resume from (no checkpoints/last); drop --resume to start")
    path = last.parent / last.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise VmoeError(f"{last} names {path.name}, which is missing; pass --resume PATH of another checkpoint")
    return path


def resolve_checkpoint(path: str | Path, option: str) -> Path:
    """A checkpoint directory, or a run directory meaning its newest checkpoint; `option` names the flag."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() and (path / "checkpoints").is_dir():
        return find_resume(path, "latest")
    if not (path / WEIGHTS).is_file():
        raise VmoeError(f"{option} {path}: not a checkpoint (no {WEIGHTS}) nor a run directory (no checkpoints/)")
    return path


def load_recipe_of(path: str | Path) -> Recipe:
    """The resolved recipe stored in a checkpoint."""
    return load_recipe(Path(path) / CONFIG)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint; one-line VmoeError when the file is missing or corrupt."""
    file = Path(path) / WEIGHTS
    try:
        return load_file(file)
    except (OSError, SafetensorError) as e:
        raise VmoeError(f"{file}: cannot read the weights ({e})") from None


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The train loop's state of a checkpoint (our own file, so full unpickling is safe)."""
    return torch.load(Path(path) / TRAIN_STATE, weights_only=False)


def load_model(path: str | Path) -> VisionTransformer:
    """The model of a checkpoint, built from its stored recipe, in evaluation mode."""
    model = VisionTransformer(load_recipe_of(path).model)
    model.load_state_dict(load_weights(path))
    return model.eval()


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints of `root`, oldest first (temporary directories never match)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())
