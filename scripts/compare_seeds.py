"""Compare two recipes over seeds: each run's test top-1 during and after training, and the paired difference.

Runs are read from their own files (`config.yaml` for `train.seed`, `metrics.jsonl` for the evaluation lines and
`elapsed_s`) and paired by seed, so the difference of A and B is taken seed by seed: the spread that one recipe
shows from seed to seed is about as large as the effects worth measuring at this scale, and pairing removes the
part two recipes share (data order, augmentation, initial weights).

Usage:  python scripts/compare_seeds.py --a runs/conv-vmoe-s0 runs/conv-vmoe-s1 --b runs/conv-vit-s0 runs/conv-vit-s1
            [--names V-MoE dense]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from vmoe_cli.checkpoint import CONFIG, METRICS, load_recipe_of
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.report import read_metrics


@dataclass
class RunSummary:
    """What one finished run measured."""

    seed: int
    evals: dict[int, float]  # step -> test top-1 (0..1)
    train_seconds: float | None  # elapsed_s of the last training line (since the run, or its last resume, began)

    @property
    def final(self) -> float:
        return self.evals[max(self.evals)]


def read_run(run_dir: str | Path) -> RunSummary:
    """The seed, evaluations and training time of a run directory; VmoeError naming the file if one is missing."""
    run_dir = Path(run_dir)
    config, metrics = run_dir / CONFIG, run_dir / METRICS
    for path in (config, metrics):
        if not path.is_file():
            raise VmoeError(f"{path}: not found; give run directories written by `vmoe pretrain` or `vmoe finetune`")
    seed = load_recipe_of(run_dir).train.seed
    evals: dict[int, float] = {}
    seconds = None
    for record in read_metrics(run_dir):
        if "eval_top1" in record:
            evals[record["step"]] = record["eval_top1"]
        elif "elapsed_s" in record:
            seconds = record["elapsed_s"]
    if not evals:
        raise VmoeError(f"{metrics}: no evaluation line yet; wait for the run's first evaluation")
    return RunSummary(seed=seed, evals=evals, train_seconds=seconds)


def paired(a: list[RunSummary], b: list[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """A's and B's runs of the same seed, by seed; a seed that only one side has is left out."""
    by_seed = {run.seed: run for run in b}
    if len(by_seed) != len(b) or len({run.seed for run in a}) != len(a):
        raise VmoeError("two runs of one side have the same train.seed: give each seed once per side")
    pairs = [(run, by_seed[run.seed]) for run in sorted(a, key=lambda r: r.seed) if run.seed in by_seed]
    if not pairs:
        raise VmoeError("no seed is on both sides: pair runs of the same train.seed")
    return pairs


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), error


def report(pairs: list[tuple[RunSummary, RunSummary]], names: tuple[str, str]) -> str:
    """A Markdown table of the pairs (final top-1 in %, evaluations on the way, training seconds) and a summary."""
    a_name, b_name = names
    lines = [
        f"| seed | {a_name} | {b_name} | {a_name} - {b_name} | {a_name} during training | {b_name} during training "
        f"| {a_name} s | {b_name} s |",
        "|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for a, b in pairs:
        during = [" / ".join(f"{100 * run.evals[s]:.2f}" for s in sorted(run.evals)[:-1]) for run in (a, b)]
        seconds = [f"{run.train_seconds:,.0f}" if run.train_seconds is not None else "" for run in (a, b)]
        lines.append(
            f"| {a.seed} | {100 * a.final:.2f} | {100 * b.final:.2f} | {100 * (a.final - b.final):+.2f} "
            f"| {during[0]} | {during[1]} | {seconds[0]} | {seconds[1]} |"
        )
    diffs = [100 * (a.final - b.final) for a, b in pairs]
    a_mean, b_mean = (statistics.fmean(100 * run.final for run in side) for side in zip(*pairs, strict=True))
    d_mean, d_error = mean_and_error(diffs)
    wins = sum(d > 0 for d in diffs)
    lines.append(
        f"\n{len(pairs)} seeds: {a_name} {a_mean:.2f}%, {b_name} {b_mean:.2f}%; {a_name} - {b_name} "
        f"{d_mean:+.2f} +- {d_error:.2f} points (mean +- standard error); {a_name} ahead on {wins} of {len(pairs)}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="run directories of recipe A")
    parser.add_argument("--b", nargs="+", required=True, help="run directories of recipe B")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="what to call A and B")
    args = parser.parse_args()
    try:
        pairs = paired([read_run(d) for d in args.a], [read_run(d) for d in args.b])
    except VmoeError as err:
        raise SystemExit(f"error: {err}") from None
    print(report(pairs, tuple(args.names)))


if __name__ == "__main__":
    main()
