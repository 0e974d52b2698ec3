"""sweep-capacity: large capacity = plain evaluation, BPR keeps the surest tokens, resume, CSV/JSON/PNG schema."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vmoe_cli.checkpoint import load_model, save_checkpoint
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.eval import sweep as sweep_module
from vmoe_cli.eval.sweep import CSV_COLUMNS, GridPoint, SweepOptions, make_grid, sweep
from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MoEMlp
from vmoe_cli.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
FAST = SweepOptions(batch_size=64, throughput_batch=16, repeats=1, warmup=0)


def save_random_model(run: Path, recipe_name: str, overrides: tuple[str, ...] = ()) -> Path:
    """A digits model with random (non-zero) head and router weights, saved as a run's checkpoint."""
    recipe = load_recipe(ROOT / "recipes" / recipe_name, overrides)
    torch.manual_seed(0)
    model = VisionTransformer(recipe.model)
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)  # varied gates, so capacity and BPR matter
    save_checkpoint(run, 1, model.state_dict(), recipe, {}, keep_last=1)
    return run


@pytest.fixture(scope="module")
def vmoe_run(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("vmoe"), "digits-vmoe.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    eval_shards("digits", cache)
    return cache


def plain_top1(run: Path, cache: Path, k: int, cf: float, bpr: bool) -> float:
    """Top-1 of full forward passes of a freshly loaded model with the given routing."""
    model = load_model(run / "checkpoints" / "step_00000001")
    model.set_routing(k=k, capacity_factor=cf, capacity=None, bpr=bpr)
    loader = build_loader(
        eval_shards("digits", cache), "test", DataConfig(mean=0.25, std=0.35), batch_size=64, image_size=8, channels=1,
        train=False,
    )  # fmt: skip
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).logits.argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def test_large_capacity_drops_nothing_and_matches_plain_evaluation(vmoe_run, cache, tmp_path):
    points = [GridPoint(2, 8.0, False), GridPoint(1, 0.25, True), GridPoint(2, 0.25, False)]
    results = sweep(vmoe_run, "digits", points, tmp_path, FAST, cache_dir=cache)
    rows = {(r["k"], r["capacity_factor"], r["bpr"]): r for r in results["rows"]}
    big = rows[(2, 8.0, False)]
    assert big["dropped_all"] == 0 and big["dropped_any"] == 0 and big["total"] == 359
    for (k, cf, bpr), row in rows.items():  # the reused dense prefix changes nothing, capacity or not
        assert row["top1"] == plain_top1(vmoe_run, cache, k, cf, bpr)
    assert rows[(2, 0.25, False)]["dropped_any"] > 0.5
    assert set(big["expert_load_per_layer"]) == {"1", "3"} and len(big["expert_load_per_layer"]["1"]) == 4


@pytest.mark.parametrize(
    "router, axes",
    [("expert_choice", ["capacity_factor"]), ("sinkhorn_expert_choice", ["capacity_factor"]),
     ("per_image", ["k", "capacity_factor", "bpr"])],
)  # fmt: skip
def test_each_router_sweeps_the_axes_that_apply(router, axes, cache, tmp_path):
    run = save_random_model(tmp_path / "run", "digits-vmoe.yaml", (f"model.moe.router={router}",))
    grid = make_grid([1, 2], [0.25, 4.0], [True, False])
    results = sweep(str(run), "digits", grid, tmp_path / "sweep", FAST, cache_dir=cache)
    assert results["axes"] == axes and results["router"] == router
    rows = results["rows"]
    if "k" in axes:
        assert len(rows) == 8
    else:  # K and BPR held at the trained values: one row per capacity
        assert [(r["k"], r["bpr"], r["capacity_factor"]) for r in rows] == [(2, False, 0.25), (2, False, 4.0)]
    low, high = rows[0], rows[1]
    assert low["dropped_all"] > high["dropped_all"] == 0  # capacity matters for every one of them
    for r in rows:
        assert r["top1"] == pytest.approx(plain_top1(run, cache, r["k"], r["capacity_factor"], r["bpr"]), abs=1e-12)


def test_bpr_keeps_the_highest_gate_tokens_at_low_capacity():
    """A crafted router: token t's gate for expert 0 grows with t's first feature; 1 slot for 8 tokens."""
    cfg = MoEConfig(num_experts=2, k=1, capacity=1, capacity_factor=None, capacity_multiple=1, group_images=1)
    moe = MoEMlp(4, 8, cfg).eval()
    with torch.no_grad():
        moe.router.proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    scores = torch.tensor([0.5, 0.1, 2.0, 0.3, 1.5, 0.2, 0.4, 0.6])  # all prefer expert 0; token 2 the most
    x = torch.zeros(1, 8, 4)
    x[0, :, 0] = scores
    cfg.bpr = False
    kept = moe(x).routing.plan.kept_GSK[0, :, 0]
    assert kept.tolist() == [True] + [False] * 7  # vanilla: the first token in group order
    cfg.bpr = True
    out = moe(x)
    kept = out.routing.plan.kept_GSK[0, :, 0]
    assert kept.tolist() == [i == 2 for i in range(8)]  # BPR: the token with the highest top-1 gate
    assert out.y[0, 2].abs().sum() > 0 and out.y[0, [0, 1, 3, 4, 5, 6, 7]].abs().sum() == 0


def test_interrupted_sweep_resumes_where_it_stopped(vmoe_run, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "SAVE_EVERY_S", 0.0)
    points = make_grid([1, 2], [0.5, 1.0], [True, False])
    whole = sweep(vmoe_run, "digits", points, tmp_path / "whole", FAST, cache_dir=cache)

    seen: list[tuple[str, int]] = []

    def stop_after_three(what: str, done: int, total: int, unit: str = "images") -> None:
        seen.append((what, done))
        if what.startswith("accuracy") and done == 3 * 64 and seen[0][1] == 0:  # a pass from 0: three batches
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(vmoe_run, "digits", points, tmp_path / "cut", FAST, cache_dir=cache, progress=stop_after_three)
    state = json.loads((tmp_path / "cut" / "sweep-state.json").read_text())
    assert state["batches_done"] == 3 and not (tmp_path / "cut" / "sweep.json").exists()

    seen.clear()
    resumed = sweep(vmoe_run, "digits", points, tmp_path / "cut", FAST, cache_dir=cache, progress=stop_after_three)
    # the pass starts where it stopped (batches 0-2 not redone) and ends at the split's 359 images
    assert [done for what, done in seen if what.startswith("accuracy")] == [192, 256, 320, 359]
    timing = {"images_per_s", "images_per_s_min", "images_per_s_max", "repeat_ms", "latency_ms"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in whole["rows"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed["rows"]]


def test_cli_writes_table_csv_json_and_plot_with_baseline(vmoe_run, cache, tmp_path):
    dense = save_random_model(tmp_path / "dense", "digits-vit.yaml")
    out = tmp_path / "sweep"
    args = ["sweep-capacity", "digits", "--checkpoint", str(vmoe_run), "--baseline", str(dense), "--out", str(out)]
    args += ["--k", "1,3", "--capacity", "0.5,2", "--batch-size", "64", "--throughput-batch", "8", "--repeats", "1"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "3*" in result.output  # K=3 is above the trained K=2
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2 * 2 * 2
    assert {r["bpr"] for r in rows} == {"true", "false"} and all(float(r["images_per_s"]) > 0 for r in rows)
    assert [r["k_above_trained"] for r in rows] == ["false"] * 4 + ["true"] * 4
    data = json.loads((out / "sweep.json").read_text())
    assert data["trained"]["k"] == 2 and data["baseline"]["top1"] >= 0 and data["split"] == "test"
    gflops = {(r["k"], r["capacity_factor"]): r["gflops"] for r in data["rows"]}
    assert gflops[(1, 0.5)] < gflops[(1, 2.0)] < gflops[(3, 2.0)]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bpr", "maybe"], "--bpr: expected on, off or on,off"),
        (["--capacity", "0,1"], "--capacity: expected positive numbers"),
        (["--k", "5"], "--k 5: the model has only 4 experts"),
        (["--split", "minival"], "no split 'minival'"),
    ],
)
def test_cli_errors_are_one_line(vmoe_run, cache, tmp_path, extra, message):
    args = ["sweep-capacity", "digits", "--checkpoint", str(vmoe_run), "--out", str(tmp_path), *extra]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output


def test_a_dense_checkpoint_is_refused_with_a_hint(cache, tmp_path):
    dense = save_random_model(tmp_path / "dense", "digits-vit.yaml")
    result = CliRunner().invoke(
        main, ["sweep-capacity", "digits", "--checkpoint", str(dense), "--cache-dir", str(cache)]
    )
    assert result.exit_code == 2 and "pass it as --baseline" in result.output


def test_fewshot_column_reuses_fewshot_with_each_settings_routing(vmoe_run, cache, tmp_path):
    from vmoe_cli.eval.fewshot import load_backbone
    from vmoe_cli.eval.probe import run_fewshot

    options = SweepOptions(batch_size=64, throughput_batch=8, repeats=1, warmup=0, fewshot_shots=5)
    points = [GridPoint(1, 0.25, True), GridPoint(2, 2.0, False)]
    rows = sweep(vmoe_run, "digits", points, tmp_path, options, cache_dir=cache)["rows"]
    for p, row in zip(points, rows, strict=True):
        backbone = load_backbone(str(vmoe_run), k=p.k, capacity_factor=p.capacity_factor, bpr=p.bpr)
        direct = run_fewshot(backbone, ["digits"], [5], 3, cache_dir=tmp_path / "own")
        assert row["fewshot_top1"] == direct["datasets"]["digits"]["summary"][5]["mean"]
    assert rows[0]["fewshot_top1"] != rows[1]["fewshot_top1"]  # the routing reaches the features


@pytest.mark.parametrize(
    ("damage", "warned"),
    [
        (lambda state: b"\xff\xfe not even text", True),
        (lambda state: b"[1, 2]", True),
        (lambda state: json.dumps({**state, "points": {"k=2 cf=1 vanilla": {"correct": "many"}}}).encode(), True),
        (lambda state: json.dumps({**state, "batches_done": None}).encode(), True),
        (lambda state: json.dumps({**state, "identity": {"another": "sweep"}}).encode(), False),
    ],
    ids=["not-text", "not-an-object", "damaged-points", "damaged-count", "another-sweep"],
)
def test_an_unreadable_state_is_replaced_with_a_warning(vmoe_run, cache, tmp_path, capsys, damage, warned):
    points = [GridPoint(2, 1.0, False)]
    first = sweep(vmoe_run, "digits", points, tmp_path, FAST, cache_dir=cache)
    state_file = tmp_path / "sweep-state.json"
    state_file.write_bytes(damage(json.loads(state_file.read_text())))
    capsys.readouterr()
    again = sweep(vmoe_run, "digits", points, tmp_path, FAST, cache_dir=cache)
    warning = f"warning: sweep state {state_file} unreadable: started afresh\n"
    assert capsys.readouterr().err == (warning if warned else "")
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in first["rows"]]
    assert json.loads(state_file.read_text())["batches_done"] == 6  # rebuilt and saved whole


def test_timing_keeps_every_repeat_and_the_range(vmoe_run, cache, tmp_path):
    options = SweepOptions(batch_size=64, throughput_batch=8, repeats=3, warmup=0)
    row = sweep(vmoe_run, "digits", [GridPoint(1, 1.0, True)], tmp_path, options, cache_dir=cache)["rows"][0]
    assert len(row["repeat_ms"]) == 3
    speeds = sorted(8000 / ms for ms in row["repeat_ms"])
    assert row["images_per_s_min"] == pytest.approx(speeds[0]) and row["images_per_s_max"] == pytest.approx(speeds[-1])
    assert row["images_per_s"] == pytest.approx(speeds[1])  # the median of three


def synthetic_sweep() -> dict:
    """Sweep results as eval.sweep writes them: K 1 and 2, BPR on and off, 3 capacities, a noisy speed."""
    rows = []
    for k in (1, 2):
        for bpr in (True, False):
            for i, cf in enumerate((0.5, 1.0, 1.25)):
                speed = 1000.0 * (3 - i) / k
                rows.append({
                    "k": k, "bpr": bpr, "capacity_factor": cf, "top1": 0.8 + 0.02 * i + 0.01 * bpr,
                    "gflops": 0.02 * k * cf, "images_per_s": speed, "images_per_s_min": speed / 3,
                    "images_per_s_max": speed * 1.5, "dropped_all": 0.3 / (i + 1), "dropped_any": 0.5 / (i + 1),
                })  # fmt: skip
    base = {
        "top1": 0.81,
        "gflops": 0.02,
        "images_per_s": 2500.0,
        "images_per_s_min": 2000.0,
        "images_per_s_max": 2600.0,
    }
    return {"rows": rows, "trained": {"k": 2, "capacity_factor": 1.25, "bpr": False}, "baseline": base,
            "split": "test", "checkpoint": "runs/x", "data": "shards/y"}  # fmt: skip


def test_sweep_figure_tells_bpr_from_vanilla_without_colour_and_keeps_the_legend_off_the_data():
    from vmoe_cli.eval.plots import sweep_figure

    fig = sweep_figure(synthetic_sweep())
    acc, speed = fig.axes[0], fig.axes[1]
    curves = {line.get_label(): line for line in acc.get_lines()}
    bpr, vanilla = curves["K=2, BPR"], curves["K=2, vanilla"]
    assert bpr.get_linestyle() != vanilla.get_linestyle() and bpr.get_markerfacecolor() != vanilla.get_markerfacecolor()
    assert curves["K=1, BPR"].get_marker() != bpr.get_marker()  # K shows without colour too
    trained = curves["trained: K=2, cf 1.25, vanilla"]
    assert (trained.get_xdata()[0], trained.get_ydata()[0]) == pytest.approx((0.02 * 2 * 1.25, 100 * 0.84))
    assert "dense twin (81.00%)" in curves
    # the speed panel: median with bars from the slowest to the fastest repeat
    bars = [c for c in speed.containers if c.has_yerr]
    assert len(bars) == 4
    segments = bars[0].lines[2][0].get_segments()
    assert [tuple(s[:, 1]) for s in segments][0] == pytest.approx((1000.0, 4500.0))  # K=1 BPR, cf 0.5: 3000/3 .. x1.5
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
