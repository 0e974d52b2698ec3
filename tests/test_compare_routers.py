"""scripts/compare_routers.py's statistics: mean and standard error per router, paired differences by seed, the
seeds where an ordering holds and its one-sided paired t-test."""

from __future__ import annotations

import math

import pytest

from scripts.compare_routers import claims, one_sided_p, summarise


def records(name: str, top1: list[float], shot: list[float]) -> list[dict]:
    return [
        {"name": name, "seed": seed, "test_top1": t, "fewshot10_top1": f, "images_per_s": 100.0, "gflops": 0.03,
         "train_seconds": 1.0}
        for seed, (t, f) in enumerate(zip(top1, shot, strict=True))
    ]  # fmt: skip


def test_the_claims_pair_routers_seed_by_seed():
    summary = summarise(
        records("token choice", [0.80, 0.70, 0.90], [0.5, 0.5, 0.5])
        + records("expert choice", [0.81, 0.72, 0.93], [0.4, 0.6, 0.5])
    )
    assert summary["expert choice"]["test_top1_mean"] == pytest.approx(0.82)
    assert summary["expert choice"]["test_top1_err"] == pytest.approx(math.sqrt(0.0111 / 3), rel=1e-3)
    # differences 1, 2, 3 points: mean 2, standard error 1/sqrt(3); with 2 degrees of freedom the t-test's tail
    # has the closed form P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2)), at t = 2 sqrt(3): 0.0371
    line = next(row for row in claims(summary).splitlines() if row.startswith("| expert choice > token choice"))
    assert line == "| expert choice > token choice | +2.00 ± 0.58 | 3/3 | 0.04 | +0.0 ± 5.8 | 1/3 | 0.50 |"
    assert one_sided_p([0.01, 0.02, 0.03]) == pytest.approx(0.5 - math.sqrt(12) / (2 * math.sqrt(14)))
    assert "Soft MoE" not in claims(summary)  # a claim about a router that did not run is left out


def test_one_seed_has_no_error_bar():
    summary = summarise(records("dense ViT", [0.8], [0.7]))
    assert math.isnan(summary["dense ViT"]["test_top1_err"]) and math.isnan(one_sided_p([0.01]))
