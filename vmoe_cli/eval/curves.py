"""A run's curves over training from its metrics.jsonl: read leniently, grouped, drawn as PNGs readable in grey.

Groups: training (task loss, evaluation top-1, learning rate, images/s, then any other top-level number),
auxiliary losses (their weighted sum and every `moe{block}/*_loss`, one line per block) and routing (every other
`moe{block}/{name}`, one line per block; a list such as `expert_load` gets one panel per block, one line per
expert). Keys are taken as they come, so a metric added to training later is drawn without a change here.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmoe_cli.eval.plots import pyplot

LAYERED = re.compile(r"moe(\d+)/(.+)")
NOT_DRAWN = {"step", "epoch", "elapsed_s", "eval_correct", "eval_total"}
TRAINING = {"loss": "task loss", "eval_top1": "evaluation top-1 (%)", "lr": "learning rate",
            "images_per_s": "training images/s"}  # fmt: skip
TRAIN, AUX, ROUTING = GROUPS = ("Training", "Auxiliary losses", "Routing over training")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "x", "P")
MAX_PANELS = 30  # per group; a hostile file with thousands of keys still gives a page
MAX_LINES = 64  # per panel (experts of the largest recipes)
MAX_LABEL = 60  # characters of a key shown

Lines = dict[str, list[tuple[float, float]]]  # line label -> (step, value) points


@dataclass
class Figure:
    """One PNG with what the page says about it."""

    title: str
    caption: str
    png: bytes


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics file with a numeric step, sorted by step, and notes on the lines left out."""
    if not path.is_file():
        return [], [f"{path.name}: not found, so no curves (training writes it at its first log step)"]
    records, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or numbers past the digit limit
                record = None
            if isinstance(record, dict) and _number(record.get("step")) is not None:
                records.append(record)
            else:
                bad.append(number)
    notes = []
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        notes.append(f"{path.name}: {len(bad)} line(s) left out, not JSON objects with a numeric step (line {shown})")
    return sorted(records, key=lambda r: _number(r["step"])), notes


def curve_figures(records: list[dict[str, Any]]) -> tuple[list[Figure], list[str]]:
    """One figure per group that has data, and notes on what was left out."""
    groups, notes = _panels(records)
    figures = []
    for group, panels in groups.items():
        if len(panels) > MAX_PANELS:
            notes.append(f"{group}: {len(panels) - MAX_PANELS} of {len(panels)} panels left out")
            panels = dict(list(panels.items())[:MAX_PANELS])
        if panels:
            figures.append(Figure(group, _CAPTIONS[group], draw_panels(panels)))
    return figures, notes


_CAPTIONS = {
    TRAIN: "Task loss and learning rate at each logged step, top-1 on the evaluation split at each evaluation, "
    "training images/s between logged steps (wall clock: it moves with whatever else the machine runs).",
    AUX: "The weighted sum of the auxiliary losses added to the task loss, then each loss before its weight, one "
    "line per MoE block (numbered by the block's index in the model).",
    ROUTING: "Routing of the last training batch at each logged step, one line per MoE block (dropped tokens, "
    "load balance: 1 = every expert equally used), then each block's expert load (tokens placed / capacity), "
    "one line per expert.",
}
NAMES = {  # the metrics training logs today; others are shown by their key
    "importance_loss": "importance loss", "load_loss": "load loss", "gshard_loss": "GShard loss",
    "z_loss": "router z-loss", "superclass_loss": "super-class loss", "superclass_top1": "super-class top-1",
    "dropped_all": "share of tokens dropped by all choices", "dropped_any": "share dropped by any choice",
    "load_entropy": "load balance (normalised entropy)", "expert_load": "expert load (placed / capacity)",
    "tokens_0_experts": "share of tokens seen by 0 experts", "tokens_1_expert": "share seen by 1 expert",
    "tokens_2plus_experts": "share seen by 2+ experts", "scale": "Soft MoE logit scale",
}  # fmt: skip


def _panels(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Lines]], list[str]]:
    """group -> panel title -> lines: known training keys first, per-expert panels last, lines in natural order."""
    groups: dict[str, dict[str, Lines]] = {TRAIN: {title: {} for title in TRAINING.values()}, AUX: {}, ROUTING: {}}
    crowded, per_expert = set(), set()
    for record in records:
        step = _number(record["step"])
        for key, value in record.items():
            if key in NOT_DRAWN:
                continue
            for group, panel, line, y in _points(str(key)[:200], value):
                lines = groups[group].setdefault(panel, {})
                if line not in lines and len(lines) >= MAX_LINES:
                    crowded.add(panel)
                    continue
                lines.setdefault(line, []).append((step, y))
                if isinstance(value, list):
                    per_expert.add(panel)
    for name, group in groups.items():
        panels = sorted((item for item in group.items() if item[1]), key=lambda item: item[0] in per_expert)
        groups[name] = {title: {k: lines[k] for k in sorted(lines, key=_natural)} for title, lines in panels}
    notes = [f"{p}: lines past the first {MAX_LINES} left out" for p in sorted(crowded)]
    return groups, notes


def _points(key: str, value: Any) -> list[tuple[str, str, str, float]]:
    """The (group, panel, line, y) points of one key of one record; none for a value that is not a number."""
    match = LAYERED.fullmatch(key)
    name = _short(NAMES.get(match[2], match[2]) if match else key)
    if isinstance(value, list):
        values = [(i, _number(v)) for i, v in enumerate(value[: MAX_LINES + 1])]
        if match:
            return [(ROUTING, f"{name}, block {match[1]}", f"expert {i}", y) for i, y in values if y is not None]
        return [(TRAIN, name, f"[{i}]", y) for i, y in values if y is not None]
    y = _number(value)
    if y is None:
        return []
    if match:
        return [(AUX if match[2].endswith("_loss") else ROUTING, name, f"block {match[1]}", y)]
    if key == "aux_loss":
        return [(AUX, "weighted sum (aux_loss)", key, y)]
    return [(TRAIN, TRAINING.get(key, name), key, 100 * y if key == "eval_top1" else y)]


def draw_panels(panels: dict[str, Lines], columns: int = 3) -> bytes:
    """A grid of panels over the step as one PNG, one step range for all; each line its own colour, dash and
    marker, so the lines stay apart in grey; legends below their panel, never over the data."""
    plt = pyplot()
    cols = min(2 if len(panels) in (2, 4) else columns, len(panels))  # 4 panels as 2 x 2, not 3 + 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    steps = [x for lines in panels.values() for points in lines.values() for x, _ in points if math.isfinite(x)]
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        for i, (label, points) in enumerate(lines.items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=_plain(label), color=f"C{i % 10}", linestyle=LINESTYLES[i % len(LINESTYLES)],
                    marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(xs) // 8), markersize=5,
                    linewidth=1.5)  # fmt: skip
        ax.set_title(_plain(title), fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        if steps and min(steps) < max(steps):
            margin = 0.02 * (max(steps) - min(steps))
            ax.set_xlim(min(steps) - margin, max(steps) + margin)
        if len(lines) > 1:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(4, len(lines)),
                      frameon=False)  # fmt: skip
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _number(value: Any) -> float | None:
    """A JSON number as a float (non-finite as NaN, drawn as a gap); None for anything else, booleans included."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value) if math.isfinite(value) else math.nan
    except OverflowError:  # an integer past float's range
        return math.nan


def _short(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 3] + "..."


def _plain(text: str) -> str:
    """Text matplotlib shows as it is: `$` would start mathematics, a leading `_` would hide a legend entry."""
    return text.replace("$", r"\$").lstrip("_") or "?"


def _natural(label: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label)]
