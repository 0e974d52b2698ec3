"""`vmoe fewshot`: a frozen backbone probed on each dataset (eval/probe.py), the results as JSON and CSV.

Open: `load_backbone` (a checkpoint with routing overrides, or the raw pixels); run: `probe.run_fewshot`;
rows: `write_results`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.opening import Preprocess, open_checkpoint
from vmoe_cli.eval.probe import Backbone, model_backbone


def load_backbone(
    checkpoint: str,
    k: int | None = None,
    capacity_factor: float | None = None,
    bpr: bool | None = None,
    dropless: bool | None = None,
    pixels_size: int = 28,
    pixels_channels: int = 1,
) -> Backbone:
    """The frozen backbone of `checkpoint` (a checkpoint or run directory) with routing overrides, or "pixels"."""
    if checkpoint == "pixels":
        preprocess = Preprocess(pixels_size, pixels_channels, 0.0, 1.0)
        return Backbone("pixels", f"pixels-{pixels_size}-{pixels_channels}", None, preprocess)
    opened = open_checkpoint(checkpoint)
    routing = {"k": k, "capacity_factor": capacity_factor, "bpr": bpr, "dropless": dropless}
    routing = {name: value for name, value in routing.items() if value is not None}
    if routing:
        if opened.model.cfg.moe is None:
            drop = "--k, --capacity-factor, --bpr and --dropless"
            raise VmoeError(f"--checkpoint {checkpoint}: a dense model; drop {drop}")
        opened.model.set_routing(**routing)
    return model_backbone(opened)


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """`results` as JSON at `out` and one CSV row per dataset, shot count and seed beside it (same stem)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(results, indent=1) + "\n")
    lines = ["dataset,shots,seed,accuracy,l2,val_accuracy"]
    for data, info in results["datasets"].items():
        for row in info["rows"]:
            val = "" if row["val_accuracy"] is None else f"{row['val_accuracy']:.6f}"
            lines.append(f"{json.dumps(data)},{row['shots']},{row['seed']},{row['accuracy']:.6f},{row['l2']:g},{val}")
    csv = out.with_suffix(".csv")
    write_text_atomic(csv, "\n".join(lines) + "\n")
    return out, csv
