"""The whole pipeline on the embedded digits, in a few minutes on a CPU: the README's main command.

shard digits -> pre-train the tiny V-MoE and its dense twin -> few-shot probe both (and raw pixels)
-> capacity sweep of the V-MoE with the dense twin as baseline -> the V-MoE's report page. Every step is
resumable: a rerun finds the shards complete, skips finished runs, resumes unfinished ones, reads cached
features and finished sweeps (the report page is rewritten).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmoe_cli.checkpoint import checkpoint_dir, checkpoint_step, find_resume
from vmoe_cli.config import load_recipe
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
from vmoe_cli.eval.fewshot import load_backbone, write_results
from vmoe_cli.eval.plots import plot_sweep
from vmoe_cli.eval.probe import run_fewshot
from vmoe_cli.eval.report_page import write_report
from vmoe_cli.eval.sweep import SweepOptions, make_grid, sweep
from vmoe_cli.progress import ProgressFn
from vmoe_cli.train.loop import pretrain
from vmoe_cli.train.report import read_metrics

DIGITS = ShardOptions(shard_size=200, minival=0.1, test=0.2)  # 1,258 train / 180 minival / 359 test
TWINS = ("digits-vmoe", "digits-vit")
CAPACITIES = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def run_quickstart(
    recipes: str | Path = "recipes",
    shards: str | Path = "shards/digits",
    out: str | Path = "runs/quickstart",
    cache_dir: str | Path = "~/.cache/vmoe",
    overrides: Sequence[str] = (),
    say: Callable[[str], None] = print,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run every step into `out`; return the artefact paths (the report page last), the few-shot results and the
    sweep results.

    `overrides` are `--set` values applied to both recipes (e.g. train.steps=50 for a smoke run); `progress` is
    told how feature extraction and the sweep go.
    """
    out, shards = Path(out), Path(shards)
    say(f"[1/5] shard digits -> {shards}")
    write_shards(open_source("digits"), shards, DIGITS, workers=1)
    runs = {}
    for i, name in enumerate(TWINS):
        runs[name] = out / name
        say(f"[2/5] pre-train {name} ({i + 1}/2) -> {runs[name]}")
        recipe = load_recipe(Path(recipes) / f"{name}.yaml", [f"data.shards={shards}", *overrides])
        result = _pretrain_or_resume(recipe, runs[name])
        say(f"      {name}: {result}")
    fewshot = {}
    for name, checkpoint in (("pixels", "pixels"), *((n, str(runs[n])) for n in TWINS)):
        say(f"[3/5] few-shot probe of {name} on {shards}")
        backbone = load_backbone(checkpoint, pixels_size=8)
        results = run_fewshot(backbone, [str(shards)], cache_dir=cache_dir, progress=progress)
        fewshot[name] = results
        write_results(results, out / "fewshot" / f"{name}.json")
    say(f"[4/5] capacity sweep of digits-vmoe on {shards} (test), dense twin as baseline -> {out / 'sweep'}")
    points = make_grid([1, 2], CAPACITIES, [True, False])
    swept = sweep(runs["digits-vmoe"], str(shards), points, out / "sweep", SweepOptions(), runs["digits-vit"],
                  cache_dir, progress)  # fmt: skip
    plot = plot_sweep(swept, out / "sweep" / "sweep.png")
    say(f"[5/5] report page of digits-vmoe -> {runs['digits-vmoe'] / 'report.html'}")
    fewshot_files = [out / "fewshot" / f"{name}.json" for name in fewshot]
    report = write_report(runs["digits-vmoe"], sweeps=[out / "sweep"], fewshots=fewshot_files)
    artefacts = {
        "shards": shards, **{f"run {n}": runs[n] for n in TWINS},
        "few-shot results": out / "fewshot", "sweep table": out / "sweep" / "sweep.csv", "sweep plot": plot,
        "report page": report.path,
    }  # fmt: skip
    return {"artefacts": artefacts, "fewshot": fewshot, "sweep": swept}


def _pretrain_or_resume(recipe: Any, run: Path) -> str:
    """Train `run` to the recipe's last step: start, resume, or report a finished run's final evaluation."""
    if not (checkpoint_dir(run) / "last").is_file():
        result = pretrain(recipe, run)
    else:
        done = checkpoint_step(find_resume(run, "latest"))
        if done < recipe.train.steps:
            result = pretrain(recipe, run, resume="latest")
        else:
            result = [record for record in read_metrics(run) if "eval_top1" in record][-1] | {"finished": True}
    note = " (already trained)" if result.get("finished") else ""
    return f"step {result['step']}, {result['eval_top1']:.4f} top-1 on minival{note}"
