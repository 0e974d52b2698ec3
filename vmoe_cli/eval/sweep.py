"""The inference-time K x capacity factor x BPR sweep of a trained V-MoE (V-MoE paper, section 4).

A trained model gets cheaper at inference by routing each token to fewer experts (K) and by shrinking
the expert buffers (cf < 1); with Batch Priority Routing the tokens that keep their slots are the ones the
router is surest about. For every grid point this records top-1 on a split, the fraction of tokens dropped
by all / at least one of their choices, per-layer expert load, analytic GFLOPs per image, and measured
throughput and latency of the full forward pass (median, and the range over the timed repeats). A dropless point
per K (optional) is the reference without capacity: every choice computed, nothing dropped.

Cost: the model is loaded once; each batch is embedded and run through the dense blocks before the first
MoE block once, and only the remaining blocks run per grid point. Progress is saved every few seconds
to `OUT/sweep-state.json`, so an interrupted sweep resumes at the batch (and timing) where it stopped.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vmoe_cli.atomic import remove_stale_temps, write_text_atomic
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.flops import flops_per_image
from vmoe_cli.eval.opening import EvalData, Opened, eval_batches, eval_loader, open_checkpoint, open_data
from vmoe_cli.eval.probe import model_backbone, run_fewshot
from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.outputs import run_lock
from vmoe_cli.progress import ProgressFn

STATE = "sweep-state.json"
SAVE_EVERY_S = 10.0  # seconds between saves of the sweep state
POINT_FIELDS = {"correct": int, "total": int, "dropped_all": dict, "dropped_any": dict, "expert_load": dict}  # sums
CSV_COLUMNS = (
    "k", "capacity_factor", "bpr", "dropless", "k_above_trained", "top1", "dropped_all", "dropped_any", "gflops",
    "images_per_s", "images_per_s_min", "images_per_s_max", "latency_ms", "fewshot_top1",
)  # fmt: skip


@dataclass(frozen=True)
class GridPoint:
    """One routing setting of the sweep: K, and a capacity factor and BPR, or dropless execution (neither)."""

    k: int
    capacity_factor: float | None
    bpr: bool
    dropless: bool = False

    @property
    def name(self) -> str:
        if self.dropless:
            return f"k={self.k} dropless"
        return f"k={self.k} cf={self.capacity_factor:g} {'bpr' if self.bpr else 'vanilla'}"


@dataclass
class SweepOptions:
    """What the sweep measures and how."""

    split: str = "test"  # evaluated split
    batch_size: int = 256  # images per evaluation batch (routing groups as the checkpoint's)
    throughput_batch: int = 64  # images per timed forward pass
    repeats: int = 5  # timed passes per grid point (median), after `warmup`
    warmup: int = 2
    fewshot_shots: int = 0  # > 0: also few-shot top-1 at this many shots per grid point (3 seeds; slow)
    device: str = "cpu"


def make_grid(
    ks: Sequence[int], capacities: Sequence[float], bprs: Sequence[bool], dropless: bool = False
) -> list[GridPoint]:
    """Every (K, cf, BPR) combination, K-major, then BPR, then cf ascending; with `dropless`, each K's dropless
    point after its capacity points."""
    if not ks or not capacities or not bprs or min(ks) < 1 or min(capacities) <= 0:
        raise VmoeError("--k needs integers >= 1 and --capacity numbers > 0")
    points = []
    for k in ks:
        points += [GridPoint(k, float(c), b) for b in bprs for c in sorted(capacities)]
        points += [GridPoint(k, None, False, dropless=True)] if dropless else []
    return points


def applicable_points(points: Sequence[GridPoint], moe: MoEConfig) -> list[GridPoint]:
    """`points` with the axes the router lacks held at their trained values, duplicates removed, order kept;
    dropless points only for routers whose tokens choose experts."""
    axes = moe.kind.sweep_axes
    if any(p.dropless for p in points) and moe.kind.choice != "token":
        raise VmoeError(f"--dropless: {moe.router} drops no token's choice, so there is no dropless mode to sweep")
    fixed = [
        GridPoint(p.k if "k" in axes else moe.k, p.capacity_factor, p.bpr if "bpr" in axes else moe.bpr, p.dropless)
        for p in points
    ]
    return list(dict.fromkeys(fixed))


def sweep(
    checkpoint: str | Path,
    data: str,
    points: Sequence[GridPoint],
    out_dir: str | Path,
    options: SweepOptions | None = None,
    baseline: str | Path | None = None,
    cache_dir: str | Path = "~/.cache/vmoe",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep; write sweep.json and sweep.csv into `out_dir` and return the results.

    `out_dir` is locked for the whole sweep: a second sweep into it stops with one line, whatever its process.
    """
    with run_lock(out_dir) as out:
        options = options or SweepOptions()
        return _sweep(checkpoint, data, points, out, options, baseline, Path(cache_dir).expanduser(), progress)


def _sweep(
    checkpoint: str | Path,
    data: str,
    points: Sequence[GridPoint],
    out: Path,
    options: SweepOptions,
    baseline: str | Path | None,
    cache_dir: Path,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    opened, points = _open_model(checkpoint, points, options.device)
    trained = asdict(opened.model.cfg.moe)  # before any grid point's routing replaces it
    source = open_data(data, cache_dir, [options.split], "pass --split")
    state = _load_state(out / STATE, _identity(opened, source, points, options, baseline))
    save = _Saver(out / STATE, state)

    if state.get("batches") is None or state["batches_done"] < state["batches"]:
        _accuracy_pass(opened, source, points, options, save, progress)
    loader = eval_loader(source.shard_dir, options.split, options.throughput_batch, opened.preprocess)
    images = next(iter(loader))[0].to(options.device)  # the timed input
    _per_point(opened, data, points, options, save, images, cache_dir, progress)
    if baseline is not None and "baseline" not in state:
        state["baseline"] = _baseline(baseline, source, options, images, progress)
        save(force=True)

    results = _results(opened, trained, data, points, options, state)
    write_text_atomic(out / "sweep.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "sweep.csv", _csv(results["rows"]))
    return results


def _per_point(
    opened: Opened,
    data: str,
    points: Sequence[GridPoint],
    options: SweepOptions,
    save: _Saver,
    images: torch.Tensor,
    cache_dir: Path,
    progress: ProgressFn | None,
) -> None:
    """Per grid point: its timing and, with `fewshot_shots`, its few-shot top-1, each saved once measured."""
    results = [save.state["points"][p.name] for p in points]
    phase = f"{'time and few-shot' if options.fewshot_shots else 'time'} {len(points)} settings"

    def measured(result: dict[str, Any]) -> bool:
        return "images_per_s" in result and (not options.fewshot_shots or "fewshot_top1" in result)

    def tell() -> None:
        if progress is not None:
            progress(phase, sum(map(measured, results)), len(points), "settings")

    if all(map(measured, results)):
        return
    tell()
    for p, result in zip(points, results, strict=True):
        if "images_per_s" not in result:
            _set_routing(opened.model, p)
            result.update(time_forward(opened.model, images, options))
            save(force=True)
        if options.fewshot_shots and "fewshot_top1" not in result:
            _set_routing(opened.model, p)
            fs = run_fewshot(model_backbone(opened), [data], [options.fewshot_shots], 3, cache_dir=cache_dir,
                             device=options.device, progress=progress)  # fmt: skip
            result["fewshot_top1"] = fs["datasets"][data]["summary"][options.fewshot_shots]["mean"]
            save(force=True)
        tell()


def _open_model(checkpoint: str | Path, points: Sequence[GridPoint], device: str) -> tuple[Opened, list[GridPoint]]:
    """The V-MoE of `checkpoint` on `device` and the points that apply to its router; one-line errors for a
    model with nothing to sweep or a K above its experts."""
    opened = open_checkpoint(checkpoint)
    moe = opened.model.to(device).cfg.moe
    if moe is None:
        raise VmoeError(f"--checkpoint {checkpoint}: a dense model has nothing to sweep; pass it as --baseline")
    if not moe.kind.sweep_axes:
        raise VmoeError(
            f"--checkpoint {checkpoint}: Soft MoE drops no token and its slots are weights; nothing to sweep"
        )
    points = applicable_points(points, moe)
    for p in points:
        if p.k > moe.num_experts:
            raise VmoeError(f"--k {p.k}: the model has only {moe.num_experts} experts")
    return opened, points


def _identity(
    opened: Opened, source: EvalData, points: Sequence[GridPoint], options: SweepOptions, baseline: str | Path | None
) -> dict[str, Any]:
    """What a saved state must match to be resumed: weights, data, split, batch sizes, grid and baseline."""
    return {
        "checkpoint": opened.weights_sha256, "data": source.manifest_sha256, "split": options.split,
        "batch_size": options.batch_size, "throughput_batch": options.throughput_batch,
        "fewshot_shots": options.fewshot_shots, "points": [p.name for p in points],
        "baseline": None if baseline is None else str(baseline),
    }  # fmt: skip


def _results(
    opened: Opened,
    trained: dict[str, Any],
    data: str,
    points: Sequence[GridPoint],
    options: SweepOptions,
    state: dict[str, Any],
) -> dict[str, Any]:
    """The sweep's record: the trained routing, one row per grid point and the baseline."""
    model = opened.model
    rows = [_row(model, p, state["points"][p.name], trained["k"], options.batch_size) for p in points]
    return {
        "checkpoint": opened.name, "data": data, "split": options.split,
        "trained": {key: trained[key] for key in ("k", "capacity_factor", "bpr", "dropless")},
        "router": trained["router"], "axes": list(model.cfg.moe.kind.sweep_axes),
        "options": asdict(options), "rows": rows, "baseline": state.get("baseline"),
    }  # fmt: skip


def _row(model: VisionTransformer, p: GridPoint, r: dict[str, Any], trained_k: int, batch_size: int) -> dict:
    """One grid point's output row from its accumulated sums (image-weighted) and timings."""
    _set_routing(model, p)  # for the analytic FLOPs of this setting
    n = r["total"]
    dropped_all = {layer: v / n for layer, v in r["dropped_all"].items()}
    dropped_any = {layer: v / n for layer, v in r["dropped_any"].items()}
    return {
        "k": p.k, "capacity_factor": p.capacity_factor, "bpr": p.bpr, "dropless": p.dropless,
        "k_above_trained": p.k > trained_k,
        "top1": r["correct"] / n, "correct": r["correct"], "total": n,
        "dropped_all": statistics.fmean(dropped_all.values()),
        "dropped_any": statistics.fmean(dropped_any.values()),
        "dropped_all_per_layer": dropped_all, "dropped_any_per_layer": dropped_any,
        "expert_load_per_layer": {layer: [v / n for v in load] for layer, load in r["expert_load"].items()},
        "gflops": flops_per_image(model.cfg, batch_size) / 1e9,
        "images_per_s": r["images_per_s"], "latency_ms": r["latency_ms"],
        "images_per_s_min": r.get("images_per_s_min"), "images_per_s_max": r.get("images_per_s_max"),
        "repeat_ms": r.get("repeat_ms"), "fewshot_top1": r.get("fewshot_top1"),
    }  # fmt: skip


@torch.inference_mode()
def _accuracy_pass(
    opened: Opened,
    source: EvalData,
    points: Sequence[GridPoint],
    options: SweepOptions,
    save: _Saver,
    progress: ProgressFn | None,
) -> None:
    """One pass over the split: dense prefix once per batch, then the MoE part for every grid point."""
    model, state = opened.model, save.state
    first_moe = model.first_moe
    loader = eval_loader(source.shard_dir, options.split, options.batch_size, opened.preprocess, state["batches_done"])
    state["batches"] = loader.steps
    total = source.manifest["splits"][options.split]["count"]
    phase = f"accuracy of {len(points)} settings {source.name} {options.split}"
    if progress is not None:  # a resumed pass starts past 0
        progress(phase, min(total, state["batches_done"] * options.batch_size), total)
    for images, labels in loader:
        images, labels = images.to(options.device), labels.to(options.device)
        dense_BND = model.run_blocks(model.embed(images), stop=first_moe).x_BND
        for p in points:
            _set_routing(model, p)
            blocks = model.run_blocks(dense_BND, start=first_moe)
            _accumulate(state["points"][p.name], model.head_from_tokens(blocks).logits, labels, blocks.routing)
        state["batches_done"] += 1
        save()
        if progress is not None:
            progress(phase, min(total, state["batches_done"] * options.batch_size), total)
    save(force=True)


def _accumulate(result: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor, routing: dict) -> None:
    """Add one batch: correct count, and per MoE layer image-weighted dropped fractions and loads."""
    n = len(labels)
    result["correct"] += int((logits.argmax(-1) == labels).sum())
    result["total"] += n
    for layer, route in routing.items():
        key = str(layer)
        m = route.metrics
        for name in ("dropped_all", "dropped_any"):
            result[name][key] = result[name].get(key, 0.0) + float(m[name]) * n
        load = (m["expert_load"].double() * n).tolist()
        old = result["expert_load"].get(key)
        result["expert_load"][key] = load if old is None else [a + b for a, b in zip(old, load, strict=True)]


@torch.inference_mode()
def time_forward(model: VisionTransformer, images: torch.Tensor, options: SweepOptions) -> dict[str, Any]:
    """Wall time of the full forward pass on `images` after warm-up: median images/s and latency, the slowest
    and fastest repeat's images/s (a busy machine shows as a wide range) and every repeat's milliseconds."""
    times = []
    for i in range(options.warmup + options.repeats):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        if i >= options.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "images_per_s": len(images) / seconds, "latency_ms": 1000 * seconds,
        "images_per_s_min": len(images) / max(times), "images_per_s_max": len(images) / min(times),
        "repeat_ms": [1000 * t for t in times],
    }  # fmt: skip


def _baseline(
    checkpoint: str | Path, source: EvalData, options: SweepOptions, images: torch.Tensor, progress: ProgressFn | None
) -> dict:
    """The dense twin's point: plain top-1, GFLOPs and timing."""
    opened = open_checkpoint(checkpoint, "--baseline")
    model = opened.model.to(options.device)
    batches = eval_batches(source, options.split, options.batch_size, opened.preprocess, "baseline", progress)
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x.to(options.device)).logits.argmax(-1).cpu() == y).sum())
            total += len(y)
    timing = time_forward(model, images, options)
    return {
        "checkpoint": str(checkpoint),
        "top1": correct / total,
        "gflops": flops_per_image(model.cfg) / 1e9,
        **timing,
    }


def _set_routing(model: VisionTransformer, p: GridPoint) -> None:
    """The point's routing; capacity execution set explicitly (per-image routing would be dropless otherwise)."""
    capacity = {} if p.dropless else {"capacity_factor": p.capacity_factor}
    model.set_routing(k=p.k, bpr=p.bpr, dropless=p.dropless, **capacity)


def _load_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The saved state of the same sweep, or a fresh one: another sweep's state is replaced, and so, with a
    warning, is a state that cannot be read back. Temp files of killed writers beside it are removed."""
    remove_stale_temps(path.parent)
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
            state = None
        same = isinstance(state, dict) and state.get("identity") == identity
        if same and _state_fits(state, identity):
            return state
        if same or not isinstance(state, dict):
            print(f"warning: sweep state {path} unreadable: started afresh", file=sys.stderr)
    points = {name: {field: kind() for field, kind in POINT_FIELDS.items()} for name in identity["points"]}
    return {"identity": identity, "batches_done": 0, "points": points}


def _state_fits(state: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a saved state has the fields the sweep reads, of the right types, for every grid point."""
    points = state.get("points")
    if not isinstance(state.get("batches_done"), int) or not isinstance(state.get("batches"), int | None):
        return False
    return isinstance(points, dict) and all(
        isinstance(points.get(name), dict) and all(isinstance(points[name].get(f), t) for f, t in POINT_FIELDS.items())
        for name in identity["points"]
    )


class _Saver:
    """Writes the state atomically at most every SAVE_EVERY_S seconds, or now when forced."""

    def __init__(self, path: Path, state: dict[str, Any]):
        self.path, self.state, self.last = path, state, time.monotonic()

    def __call__(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last >= SAVE_EVERY_S:
            write_text_atomic(self.path, json.dumps(self.state))
            self.last = time.monotonic()


def _csv(rows: list[dict[str, Any]]) -> str:
    """A header and one line per grid point; booleans as true/false, missing values empty."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    lines = [",".join(CSV_COLUMNS)] + [",".join(cell(row[c]) for c in CSV_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"
