"""Train every router of the Fashion-MNIST recipes over several seeds with the same budget and compare them.

For each router (the dense twin, softmax token choice, expert choice, Soft MoE, Sinkhorn token and expert choice,
sparsity-constrained expert choice, per-image routing with and without super-class guidance), all at the same
expert slots per image, and each seed: pre-train for --steps steps (the recipe's schedule squeezed into them), then
measure test top-1, 10-shot ridge top-1 on the frozen features, images/s of the forward pass (median and range over
repeats) and analytic GFLOPs per image. The table gives mean and standard error over seeds; the differences between
routers are taken seed by seed (the same seed gives the same data order), so the shared part of the noise cancels.
Finished runs and their measurements are reused, so an interrupted comparison picks up where it stopped, and a
finished one prints its tables and draws its figure again in seconds.

    python scripts/compare_routers.py --shards shards/fmnist --steps 800 --seeds 0,1,2 --figure docs/compare-routers.png
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from vmoe_cli.config import load_recipe
from vmoe_cli.eval.fewshot import load_backbone
from vmoe_cli.eval.flops import flops_per_image
from vmoe_cli.eval.opening import eval_loader, open_checkpoint
from vmoe_cli.eval.plots import pyplot
from vmoe_cli.eval.probe import run_fewshot
from vmoe_cli.eval.sweep import SweepOptions, time_forward
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
# name -> (recipe, overrides): every recipe spends 40 expert slots per image
ROUTERS = {
    "dense ViT": ("fmnist-vit", []),
    "token choice": ("fmnist-vmoe", []),
    "expert choice": ("fmnist-expert-choice", []),
    "Soft MoE": ("fmnist-soft", []),
    "Sinkhorn token choice": ("fmnist-sinkhorn-tc", []),
    "Sinkhorn expert choice": ("fmnist-sinkhorn-ec", []),
    "sparsity-constrained EC": ("fmnist-sparsity-constrained", []),
    "per image + super-classes": ("fmnist-per-image", []),
    "per image, no guidance": ("fmnist-per-image", ["model.moe.superclass_weight=0"]),
}
# the papers' orderings: (better, worse)
CLAIMS = [
    ("expert choice", "token choice"),
    ("Sinkhorn expert choice", "Sinkhorn token choice"),
    ("sparsity-constrained EC", "token choice"),
    ("Soft MoE", "token choice"),
    ("Soft MoE", "expert choice"),
    ("per image + super-classes", "dense ViT"),
    ("per image + super-classes", "per image, no guidance"),
    ("token choice", "dense ViT"),
]


def run_dir(name: str, seed: int, args: argparse.Namespace) -> Path:
    slug = name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")
    return args.out / f"{slug}-s{seed}"


def train_or_reuse(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Pre-train one router and seed for `args.steps` steps (or reuse a finished run); its test top-1 and time."""
    recipe_name, extra = ROUTERS[name]
    schedule = [f"train.steps={args.steps}", f"train.warmup_steps={args.steps // 16}", f"train.seed={seed}"]
    overrides = [f"data.shards={args.shards}", *schedule, "train.eval_every=0", "train.checkpoint_every=0", *extra]
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", overrides)
    run = run_dir(name, seed, args)
    record_file = run / "compare.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("steps") == args.steps:
            return record
    shutil.rmtree(run, ignore_errors=True)  # an unfinished or other-budget run starts over: one schedule for all
    start = time.perf_counter()
    result = pretrain(recipe, run)
    seconds = time.perf_counter() - start
    record = {"name": name, "seed": seed, "steps": args.steps, "test_top1": result["eval_top1"]}
    record["train_seconds"] = seconds
    record_file.write_text(json.dumps(record))
    return record


def measure(record: dict, args: argparse.Namespace) -> dict:
    """10-shot top-1, images/s (median and range over repeats) and GFLOPs of a trained run, kept in its record
    (a run measured once is not measured again)."""
    if "images_per_s" in record:
        return record
    run = run_dir(record["name"], record["seed"], args)
    fewshot = run_fewshot(load_backbone(str(run)), [str(args.shards)], [10], seeds=3, cache_dir=args.cache_dir)
    record["fewshot10_top1"] = fewshot["datasets"][str(args.shards)]["summary"][10]["mean"]
    opened = open_checkpoint(run)
    images = next(iter(eval_loader(args.shards, "test", args.batch, opened.preprocess)))[0]
    with torch.inference_mode():
        record.update(time_forward(opened.model, images, SweepOptions(repeats=args.repeats)))
    record["gflops"] = flops_per_image(opened.model.cfg, args.batch) / 1e9
    (run / "compare.json").write_text(json.dumps(record))
    return record


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan error for a single value)."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), error


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per router: mean and standard error over seeds of each measure, and the per-seed values."""
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        rows = sorted((r for r in records if r["name"] == name), key=lambda r: r["seed"])
        entry: dict = {"seeds": [r["seed"] for r in rows], "gflops": rows[0]["gflops"]}
        for key in ("test_top1", "fewshot10_top1", "images_per_s", "train_seconds"):
            entry[key] = [r[key] for r in rows]
            entry[f"{key}_mean"], entry[f"{key}_err"] = mean_and_error(entry[key])
        summary[name] = entry
    return summary


def paired_differences(summary: dict[str, dict], better: str, worse: str, key: str) -> list[float]:
    """`better - worse` in `key`, seed by seed, over the seeds both ran."""
    a, b = summary[better], summary[worse]
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    return [a[key][a["seeds"].index(s)] - b[key][b["seeds"].index(s)] for s in seeds]


def one_sided_p(diffs: list[float]) -> float:
    """p-value of a one-sided paired t-test that the mean difference is above 0 (nan below 2 seeds)."""
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(diffs, 0.0, alternative="greater").pvalue) if len(diffs) > 1 else math.nan


def table(summary: dict[str, dict]) -> str:
    """The Markdown table of the README: mean +- standard error over seeds."""
    lines = ["| router | seeds | test top-1 % | 10-shot % | images/s | GFLOPs/image |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        lines.append(
            f"| {name} | {len(s['seeds'])} | {100 * s['test_top1_mean']:.2f} ± {100 * s['test_top1_err']:.2f} | "
            f"{100 * s['fewshot10_top1_mean']:.1f} ± {100 * s['fewshot10_top1_err']:.1f} | "
            f"{s['images_per_s_mean']:,.0f} | {s['gflops']:.4f} |"
        )
    return "\n".join(lines)


def claims(summary: dict[str, dict]) -> str:
    """Each ordering of the papers: the paired difference (mean +- standard error, in points) in test top-1 and
    in 10-shot, the seeds where it holds, and the one-sided paired t-test's p-value."""
    lines = ["| claim | test top-1 difference | holds in | p | 10-shot difference | holds in | p |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for better, worse in CLAIMS:
        if better not in summary or worse not in summary:
            continue
        cells = [f"{better} > {worse}"]
        for key, digits in (("test_top1", 2), ("fewshot10_top1", 1)):
            diffs = paired_differences(summary, better, worse, key)
            mean, error = mean_and_error(diffs) if diffs else (math.nan, math.nan)
            holds = sum(d > 0 for d in diffs)
            cells += [f"{100 * mean:+.{digits}f} ± {100 * error:.{digits}f}", f"{holds}/{len(diffs)}",
                      f"{one_sided_p(diffs):.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(summary: dict[str, dict], path: Path) -> None:
    """Top-1 and 10-shot against GFLOPs and against images/s; one marker per router (readable in grey)."""
    plt = pyplot()
    markers = "os^vDP*Xph"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (name, s) in enumerate(summary.items()):
        style = {"marker": markers[i % len(markers)], "color": plt.cm.viridis(i / max(1, len(summary) - 1))}
        for ax, x, xerr in ((axes[0], s["gflops"], None), (axes[1], s["images_per_s_mean"], s["images_per_s_err"])):
            ax.errorbar(x, 100 * s["test_top1_mean"], yerr=100 * s["test_top1_err"], xerr=xerr, ls="none",
                        ms=8, capsize=3, label=name if ax is axes[0] else None, **style)  # fmt: skip
            ax.errorbar(x, 100 * s["fewshot10_top1_mean"], yerr=100 * s["fewshot10_top1_err"], ls="none", ms=8,
                        mfc="none", capsize=3, **style)  # fmt: skip
    axes[0].set(xlabel="GFLOPs per image (analytic)", ylabel="top-1 % (filled: test, hollow: 10-shot)")
    axes[1].set(xlabel="images/s, forward pass (mean over seeds ± s.e.)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Fashion-MNIST routers, same expert slots per image (mean ± standard error over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("shards/fmnist"))
    parser.add_argument("--steps", type=int, default=800, help="training steps per router (same budget for all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-routers"))
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vmoe").expanduser())
    parser.add_argument("--batch", type=int, default=64, help="images per timed forward pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=list(ROUTERS), help="names of ROUTERS to run")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, measure nothing")
    parser.add_argument("--figure", type=Path, help="write the figure here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = [train_or_reuse(name, seed, args) for seed in seeds for name in args.only]
    if args.train_only:
        return
    records = [measure(record, args) for record in trained]
    summary = summarise(records)
    threads = torch.get_num_threads()
    print(f"\nFashion-MNIST, {args.steps} steps of batch 128 each, seeds {args.seeds}, {threads} threads")
    print(table(summary), "\n", claims(summary), sep="\n")
    (args.out / "compare.json").write_text(json.dumps({"records": records, "summary": summary}, indent=1))
    if args.figure:
        figure(summary, args.figure)


if __name__ == "__main__":
    main()
