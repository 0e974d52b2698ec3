"""Recipes: YAML -> typed dataclasses, `--set` overrides, validation with suggestions.

A recipe is one YAML file whose sections fill dataclasses: `model:` (models/config.py), `data:`
(data/config.py: which shards, how they are read and augmented) and `train:` (below: optimiser, schedule,
duration, logging and checkpointing). `data` and `train` are optional: `model-info` needs only the model.
`from_dict` is generic: it walks the dataclass fields and their type hints, so a new
config field is a new recipe key with no parsing code. Every mistake becomes one
`VmoeError` line naming the file and the full dotted key, with a suggestion when a
close spelling exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.data.config import DataConfig
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ModelConfig

T = TypeVar("T")


@dataclass
class TrainConfig:
    """One training run: duration, optimiser, schedule, loss, precision, logging and checkpoints.

    A step is one optimiser update of `batch_size` images in all, over all processes and `grad_accum`
    micro-batches, so the per-process micro-batch is batch_size / (processes * grad_accum).
    """

    batch_size: int = 128  # images per optimiser step, summed over processes and accumulation
    steps: int | None = None  # optimiser steps; wins over `epochs` when both are set
    epochs: float | None = None  # duration in passes over the train split, when `steps` is null
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW (decoupled decay) or SGD with momentum
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0  # on weight matrices only (Linear/conv/expert/router kernels), never on biases,
    #   LayerNorm, position embedding or CLS; decoupled for adamw, torch's L2 for sgd
    momentum: float = 0.9  # sgd momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw betas
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr; capped at half of the run
    schedule: Literal["cosine", "linear", "rsqrt", "constant"] = "cosine"  # decay after warmup (to 0 but rsqrt)
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; null = no clipping
    label_smoothing: float = 0.0  # targets (1 - s) * one_hot + s / classes
    loss: Literal["softmax", "sigmoid"] = "softmax"  # softmax cross-entropy or per-class sigmoid BCE
    grad_accum: int = 1  # micro-batches per optimiser step
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # Accelerate autocast
    fsdp: bool = False  # shard parameters, gradients and optimizer state over processes (FSDP2, one unit per
    #   block) for models that do not fit one device; False = DDP, a full replica per process
    expert_parallel: int = 1  # N: the experts of every MoE layer spread over N processes (E/N each), tokens sent
    #   to them; W processes form W/N data-parallel replicas of N; 1 = every process holds every expert
    compile: bool = False  # torch.compile the training forward and backward (inductor; on CPU it needs a C++
    #   compiler): faster steps after a compile of tens of seconds (README: `vmoe pretrain`); eval stays eager
    eval_every: int = 0  # evaluate every N steps; 0 = only at the end (always at the end)
    checkpoint_every: int = 0  # checkpoint every N steps; 0 = only at the end (always at the end)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    seed: int = 0  # seeds the model init, data order, augmentation and every step's noise
    log_every: int = 10  # write a metrics line every N steps
    tensorboard: bool = False  # also write the metrics as TensorBoard events to RUN/tensorboard (extra: tensorboard)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes held fixed, e.g. [patch_embed,
    #   blocks.0]; a prefix matches whole dotted components (blocks.1 is not blocks.10); [] = train everything

    def validate(self) -> None:
        """Raise VmoeError naming the key when a value is impossible."""
        if self.steps is None and self.epochs is None:
            raise VmoeError("set train.steps or train.epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise VmoeError("train.steps and train.epochs must be > 0")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "log_every": self.log_every}
        positive |= {"keep_last": self.keep_last, "expert_parallel": self.expert_parallel}
        for name, value in positive.items():
            if value < 1:
                raise VmoeError(f"train.{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise VmoeError(f"train.{name} must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise VmoeError("train.lr must be > 0, train.weight_decay >= 0 and train.label_smoothing in [0, 1)")
        if len(self.betas) != 2:
            raise VmoeError(f"train.betas must be two numbers, got {self.betas}")


@dataclass
class Recipe:
    """One recipe file: the model, and for training commands the data and train sections."""

    model: ModelConfig  # the `model:` section
    description: str = ""  # one line saying what the recipe is for
    data: DataConfig | None = None  # the `data:` section; training and evaluation need it
    train: TrainConfig | None = None  # the `train:` section; pretrain and finetune need it


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe, apply `dotted.key=value` overrides, build and validate it.

    Raises VmoeError with one line naming the file for every user mistake.
    """
    return recipe_from_dict(_read_with_bases(Path(path)), overrides, str(path))


def recipe_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), source: str = "recipe") -> Recipe:
    """Build and validate a recipe from its nested dict after `dotted.key=value` overrides (`data` is changed).

    Every user mistake is one VmoeError line starting with `source`.
    """
    for override in overrides:
        _apply_override(data, override)
    try:
        recipe = from_dict(Recipe, data)
        moe = recipe.model.moe
        if moe is not None and isinstance(moe.superclasses, str):  # the resolved recipe carries the list itself
            moe.superclasses = read_superclasses(moe.superclasses, recipe.model.num_classes, moe.num_experts)
        recipe.model.validate()
        if recipe.data is not None:
            recipe.data.augment.validate()
        if recipe.train is not None:
            recipe.train.validate()
            if recipe.train.expert_parallel > 1 and moe is not None and moe.dropless:
                raise VmoeError(
                    f"train.expert_parallel={recipe.train.expert_parallel} exchanges fixed-size expert buffers, "
                    "model.moe.dropless=true has none: set one of them off"
                )
    except VmoeError as e:
        raise VmoeError(f"{source}: {e}") from None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict of a recipe (what `dump_recipe` writes and `load_recipe` reads back)."""
    return dataclasses.asdict(recipe)


def read_superclasses(path: str | Path, num_classes: int, experts: int) -> list[int]:
    """The super-class (expert index) of each class from a `vmoe superclasses` file, checked against the model
    that will route by it: `num_classes` classes and `experts` experts, every expert given some class."""
    rerun = f"rerun `vmoe superclasses --experts {experts}`"
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VmoeError(f"{path}: cannot read the super-classes ({e}); {rerun}") from None
    groups = record.get("class_to_group") if isinstance(record, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise VmoeError(f"{path}: no list of integers 'class_to_group'; {rerun}")
    if len(groups) != num_classes:
        raise VmoeError(f"{path}: groups {len(groups)} classes but the model has {num_classes}; {rerun}")
    if len(set(groups)) != experts:
        raise VmoeError(f"{path}: has {len(set(groups))} super-classes but the model has {experts} experts; {rerun}")
    if not all(0 <= g < experts for g in groups):
        raise VmoeError(f"{path}: super-class indices outside 0..{experts - 1}; {rerun}")
    return groups


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML atomically: temp file in the same directory, then rename."""
    write_text_atomic(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types; `where` is the dotted key prefix."""
    if not isinstance(data, Mapping):
        raise VmoeError(f"{where or 'recipe'} must be a mapping (key: value lines), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            raise VmoeError(f"unknown key {_join(where, key)!r} ({hint})")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise VmoeError(f"missing key {_join(where, name)!r}")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type hint `tp` and return it converted (int -> float, nested dataclasses)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if value is not None and len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return from_dict(options[0], value, where)  # a nested section: its own error is more precise
        for option in options:
            try:
                return _convert(value, option, where)
            except VmoeError:
                pass
        raise VmoeError(f"{where} must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VmoeError(f"{where} must be {_describe(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise VmoeError(f"{where} must be {_describe(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)  # PyYAML reads `1e-6` (no dot) as a string
        except (ValueError, OverflowError):
            number = math.nan
        if math.isfinite(number):  # no setting means anything by NaN or infinity (.nan, .inf, --set x=nan)
            return number
    if tp is str and isinstance(value, str):
        return value
    if tp not in (bool, int, float, str):
        raise TypeError(f"config field {where} has a type from_dict does not handle: {tp!r}")
    raise VmoeError(f"{where} must be {_describe(tp)}, got {value!r}")


def _describe(tp: Any) -> str:
    """Type hint in words, for error messages."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    return words[tp]


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe with its `base:` chain merged in: `base: other.yaml` (relative to this file) is read first and
    this file's keys override it, section by section (a variant states only what differs)."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise VmoeError(f"{path}: base must be the path of another recipe, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise VmoeError(f"{path}: base {base} leads back to itself")
    return _merge(_read_with_bases(base_path, (*seen, path.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else (null included) replaces."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """The recipe file as a dict; VmoeError naming the file when it cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VmoeError(f"{path}: no such recipe file (recipes live in recipes/*.yaml)") from None
    except UnicodeDecodeError:
        raise VmoeError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise VmoeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise VmoeError(f"{path}: invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise VmoeError(f"{path}: the top level must be a mapping (key: value lines), got {got}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` in place; the value is YAML, missing or null sections become mappings."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise VmoeError(f"--set {override!r}: expected dotted.key=value, e.g. model.moe.k=1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise VmoeError(f"--set {override!r}: the value is not valid YAML") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise VmoeError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = value
