"""Checkpoints: model weights + resolved recipe + resumable training state, written atomically.

Layout of a run directory:
  RUN/checkpoints/step_00000300/model.safetensors   the model's state dict
  RUN/checkpoints/step_00000300/config.yaml         the resolved recipe (load_recipe reads it back)
  RUN/checkpoints/step_00000300/train_state.json    what the train loop needs to resume (opaque here): plain
  RUN/checkpoints/step_00000300/train_state.safetensors   values in JSON, its tensors by name in safetensors
  RUN/checkpoints/last                              name of the newest complete checkpoint

A checkpoint is written into `.tmp-step_...` and renamed into place, then `last` is replaced
atomically, so a crash at any moment leaves only complete checkpoints behind. Train, eval and
convert all read checkpoints through this module.

Nothing read from a run directory can run code: the training state is never unpickled (an older vmoe's pickled
train_state.pt is read with torch's weights-only loader, plain values only), and `last` may only name a
`step_*` directory of its own checkpoints folder.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.config import Recipe, dump_recipe, load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.vit import VisionTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"  # one JSON line per log step and evaluation, written by train/report.py
TRAIN_STATE = "train_state.json"
TRAIN_TENSORS = "train_state.safetensors"
LEGACY_STATE = "train_state.pt"  # pickled by vmoe before train_state.json; read as plain values only
STATE_FORMAT = "vmoe-train-state-1"
TENSOR, TUPLE, ITEMS = TAGS = ("__tensor__", "__tuple__", "__items__")  # one-key JSON objects for what JSON lacks
STEP_NAME = re.compile(r"step_\d+")


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
    _remove(tmp)  # left by a crash
    tmp.mkdir()
    dump_recipe(recipe, tmp / CONFIG)  # first: its mode is what the umask allows, and the others copy it
    _save_tensors({k: v.detach().contiguous() for k, v in weights.items()}, tmp / WEIGHTS, tmp / CONFIG)
    _write_train_state(tmp, train_state)
    _remove(final)  # a rerun of the same step
    os.replace(tmp, final)
    write_text_atomic(root / "last", name + "\n")
    for old in _complete(root)[:-keep_last]:
        _remove(old)
    return final


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory, from its name `step_XXXXXXXX`."""
    return int(Path(path).name.removeprefix("step_"))


def find_resume(run_dir: str | Path, which: str) -> Path:
    """The checkpoint to resume from: 'latest' (the one `RUN/checkpoints/last` names) or a path (the user's own
    choice, taken as given)."""
    if which != "latest":
        path = Path(which)
        has_state = (path / TRAIN_STATE).is_file() or (path / LEGACY_STATE).is_file()
        if not (path / WEIGHTS).is_file() or not has_state:
            raise VmoeError(f"--resume {which}: not a complete checkpoint directory ({WEIGHTS}, {TRAIN_STATE})")
        return path
    last = checkpoint_dir(run_dir) / "last"
    if not last.is_file():
        raise VmoeError(f"{run_dir}: no checkpoint to resume from (no checkpoints/last); drop --resume to start")
    with last.open("rb") as f:
        name = f.read(64).decode("utf-8", "replace").strip()
    path = last.parent / name
    if not STEP_NAME.fullmatch(name) or path.is_symlink():
        raise VmoeError(
            f"{last} names {name!r}, not a step_XXXXXXXX directory of its own folder; "
            "give a checkpoint directory's path instead"
        )
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


def load_train_state(path: str | Path) -> Any:
    """The train loop's state of checkpoint `path` as `save_checkpoint` was given it: plain values and tensors,
    never objects (the caller checks its shape). One-line VmoeError naming the file when it cannot be read."""
    path = Path(path)
    if not (path / TRAIN_STATE).is_file() and (path / LEGACY_STATE).is_file():
        return _load_legacy_state(path / LEGACY_STATE)
    file, tensors_file = path / TRAIN_STATE, path / TRAIN_TENSORS
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VmoeError(
            f"{file}: cannot read the training state ({e}); pass --resume PATH of another checkpoint"
        ) from None
    try:
        tensors = load_file(tensors_file)
    except (OSError, SafetensorError) as e:
        raise VmoeError(f"{tensors_file}: cannot read the training state's tensors ({e}); pass --resume PATH of "
                        "another checkpoint") from None  # fmt: skip
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT or "state" not in record:
        raise VmoeError(f"{file}: not a training state of this vmoe (format {STATE_FORMAT}); pass --resume PATH "
                        "of another checkpoint")  # fmt: skip
    try:
        return _decode(record["state"], tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise VmoeError(f"{file}: damaged training state ({type(e).__name__}: {e}); pass --resume PATH of "
                        "another checkpoint") from None  # fmt: skip


def load_model(path: str | Path) -> VisionTransformer:
    """The model of a checkpoint, built from its stored recipe, in evaluation mode."""
    model = VisionTransformer(load_recipe_of(path).model)
    model.load_state_dict(load_weights(path))
    return model.eval()


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints of `root`, oldest first (temporary directories never match)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def _remove(path: Path) -> None:
    """Delete a checkpoint directory of the run; a symbolic link in its place is unlinked, never followed."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_train_state(directory: Path, state: dict[str, Any]) -> None:
    """`state` as train_state.json (plain values) + train_state.safetensors (its tensors, named by their path)."""
    tensors: dict[str, torch.Tensor] = {}
    record = {"format": STATE_FORMAT, "state": _encode(state, "", tensors)}
    _save_tensors(tensors, directory / TRAIN_TENSORS, directory / CONFIG)
    (directory / TRAIN_STATE).write_text(json.dumps(record), encoding="utf-8")


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path, like: Path) -> None:
    """safetensors' file, readable as `like` is: `save_file` makes 0600 files whatever the umask."""
    save_file(tensors, file)
    os.chmod(file, like.stat().st_mode & 0o777)


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, exactly recoverable by `_decode`: tensors go into `tensors` under `name` (their path),
    tuples and dicts with keys other than strings become tagged objects."""
    if isinstance(value, torch.Tensor):
        key = name.removeprefix("/")
        key = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[key] = value.detach().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple | list):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _tagged(value):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {ITEMS: [[_encode(k, "", {}), _encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"training state {name or '/'}: a {type(value).__name__} cannot be stored")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """What `_encode` made `value` from (KeyError, TypeError or ValueError when it made no such thing)."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _tagged(value):
        ((tag, inner),) = value.items()
        if tag == TENSOR:
            return tensors[inner]
        if tag == TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _tagged(value: dict[Any, Any]) -> bool:
    """Whether a JSON object is one of `_encode`'s tags (a stored dict that looks like one is stored as items)."""
    return len(value) == 1 and next(iter(value)) in TAGS


def _load_legacy_state(file: Path) -> Any:
    """An older vmoe's pickled train_state.pt, through torch's weights-only unpickler: tensors, plain values and
    numpy's RNG key array are built, any other object (code a crafted file would run) is refused."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickles: the one line below says it all
            return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError):
        raise VmoeError(
            f"{file}: an older vmoe's training state that is damaged or holds more than plain data; not loaded: "
            f"start a new run from its weights with `vmoe finetune RECIPE --from {file.parent}`"
        ) from None


def _numpy_array_globals() -> list[Any]:
    """What unpickling numpy's uint32 RNG key array needs, under the module names numpy 1 and 2 pickle it by."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), *((_reconstruct, n) for n in names)]
