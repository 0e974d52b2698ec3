"""scripts/compare_seeds.py: runs paired by seed, the paired difference and its error, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.compare_seeds import mean_and_error, paired, read_run, report
from vmoe_cli.checkpoint import CONFIG
from vmoe_cli.config import dump_recipe, load_recipe
from vmoe_cli.errors import VmoeError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits-vmoe.yaml"


def write_run(root: Path, name: str, seed: int, evals: dict[int, float], seconds: float) -> Path:
    """A run directory as `vmoe pretrain` leaves it: the resolved recipe with train.seed, metrics.jsonl."""
    run = root / name
    run.mkdir()
    dump_recipe(load_recipe(RECIPE, [f"train.seed={seed}", f"train.steps={max(evals)}"]), run / CONFIG)
    lines = []
    for step, top1 in sorted(evals.items()):
        elapsed = seconds * step / max(evals)
        lines.append({"step": step, "loss": 1.0, "lr": 0.1, "images_per_s": 10.0, "elapsed_s": elapsed})
        lines.append({"step": step, "eval_top1": top1, "eval_correct": round(top1 * 100), "eval_total": 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_runs_pair_by_seed_and_the_difference_is_taken_seed_by_seed(tmp_path):
    a = [write_run(tmp_path, f"a{s}", s, {10: 0.5, 20: top1}, 40.0) for s, top1 in [(2, 0.91), (0, 0.90), (1, 0.88)]]
    b = [write_run(tmp_path, f"b{s}", s, {10: 0.6, 20: top1}, 30.0) for s, top1 in [(0, 0.89), (1, 0.89), (5, 0.99)]]
    pairs = paired([read_run(p) for p in a], [read_run(p) for p in b])
    assert [(x.seed, y.seed) for x, y in pairs] == [(0, 0), (1, 1)]  # seeds 2 and 5 have no partner
    assert pairs[0][0].final == 0.90 and pairs[0][0].evals == {10: 0.5, 20: 0.90}
    assert pairs[0][0].train_seconds == pytest.approx(40.0)
    text = report(pairs, ("moe", "dense"))
    assert "| 0 | 90.00 | 89.00 | +1.00 | 50.00 | 60.00 | 40 | 30 |" in text
    assert "| 1 | 88.00 | 89.00 | -1.00 |" in text
    # differences +1 and -1: mean 0, sample std sqrt(2), standard error 1
    assert "moe 89.00%, dense 89.00%; moe - dense +0.00 +- 1.00 points" in text
    assert "moe ahead on 1 of 2" in text


def test_mean_and_error():
    assert mean_and_error([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / 3**0.5))
    assert mean_and_error([4.0]) == (4.0, 0.0)


def test_missing_files_and_repeated_seeds_are_one_line_errors(tmp_path):
    with pytest.raises(VmoeError, match="config.yaml: not found"):
        read_run(tmp_path)
    run = write_run(tmp_path, "r", 0, {10: 0.5}, 1.0)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(VmoeError, match="no evaluation line yet"):
        read_run(run)
    twice = read_run(write_run(tmp_path, "s", 3, {10: 0.5}, 1.0))
    with pytest.raises(VmoeError, match="same train.seed"):
        paired([twice, twice], [twice])


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
    run = write_run(tmp_path, "killed", 0, {10: 0.5, 20: 0.7}, 8.0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "loss": 0.')
    summary = read_run(run)
    assert summary.evals == {10: 0.5, 20: 0.7} and summary.train_seconds == pytest.approx(8.0)
