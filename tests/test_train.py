"""pretrain: metrics and checkpoints, bit-identical resume after SIGKILL, NaN abort, two CPU processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vmoe_cli.checkpoint import find_resume, load_model
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.loop import pretrain
from vmoe_cli.train.optim import lr_factor, warmup_steps
from vmoe_cli.train.report import TIMING

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-vmoe.yaml"
VENV_BIN = Path(sys.executable).parent


def settings(shards: Path, steps: int, **train: object) -> list[str]:
    values = {"steps": steps, "log_every": 5, "eval_every": 0, "checkpoint_every": 0, "warmup_steps": 5, **train}
    return [f"data.shards={shards}"] + [f"train.{k}={v}" for k, v in values.items()]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def weights_digest(checkpoint: Path) -> str:
    tensors = load_file(checkpoint / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].numpy().tobytes())
    return digest.hexdigest()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmoe_cli.cli", *args]


def test_pretrain_writes_metrics_evals_and_checkpoints(digits, tmp_path):
    recipe = load_recipe(RECIPE, settings(digits, 30, eval_every=15, checkpoint_every=10, keep_last=2))
    result = pretrain(recipe, tmp_path / "run")
    run = tmp_path / "run"
    records = metrics(run)
    train_lines = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in evals] == [15, 30] and all(r["eval_total"] == 180 for r in evals)
    assert result == evals[-1] and result["eval_top1"] > 0.3  # 10 classes: chance is 0.1
    last = train_lines[-1]
    assert {"lr", "aux_loss", "images_per_s", "moe1/dropped_all", "moe3/load_entropy"} <= last.keys()
    assert len(last["moe3/expert_load"]) == 4 and last["loss"] < train_lines[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_00000020", "step_00000030"]
    assert find_resume(run, "latest").name == "step_00000030"
    model = load_model(find_resume(run, "latest"))
    assert model(torch.zeros(3, 1, 8, 8)).logits.shape == (3, 10)
    assert (run / "config.yaml").is_file()


def test_killed_run_resumes_to_identical_weights_and_metrics(digits, tmp_path):
    args = ["pretrain", str(RECIPE), *sum((["--set", s] for s in settings(digits, 60, checkpoint_every=7)), [])]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli(*args, "--out", str(whole)), check=True, capture_output=True, cwd=ROOT)

    process = subprocess.Popen(cli(*args, "--out", str(killed)), cwd=ROOT, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoints" / "last").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = find_resume(killed, "latest").name
    assert killed_at != "step_00000060", "the run finished before the kill; the test proves nothing"
    subprocess.run(cli(*args, "--out", str(killed), "--resume", "latest"), check=True, capture_output=True, cwd=ROOT)

    final = "checkpoints/step_00000060"
    assert weights_digest(killed / final) == weights_digest(whole / final)
    assert without_timing(metrics(killed)) == without_timing(metrics(whole))


def test_nan_loss_stops_with_one_line(digits, tmp_path):
    args = ["pretrain", str(RECIPE), "--out", str(tmp_path / "run")]
    args += sum((["--set", s] for s in settings(digits, 20, lr=1e30, grad_clip="null")), [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is not finite" in errors[0] and "Traceback" not in result.stderr


def test_existing_run_needs_resume(digits, tmp_path):
    args = ["pretrain", str(RECIPE), "--out", str(tmp_path / "run")]
    args += sum((["--set", s] for s in settings(digits, 5)), [])
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--resume latest" in result.stderr


def test_warmup_past_half_a_shortened_run_is_capped_with_a_notice(digits, tmp_path, monkeypatch):
    """`train.steps` set below the recipe's warmup: the lr still reaches its peak, at half the run, then decays."""
    cfg = load_recipe(RECIPE, ["train.steps=10", "train.warmup_steps=20"]).train
    factors = [lr_factor(step, 10, cfg) for step in range(10)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:] == sorted(factors[5:], reverse=True) and factors[-1] < 0.1  # then the cosine decay
    for path in sorted((ROOT / "recipes").glob("*.yaml")):  # no shipped recipe warms up past half its run
        train = load_recipe(path).train
        assert train is None or train.steps is None or warmup_steps(train.steps, train) == train.warmup_steps

    args = ["pretrain", str(RECIPE), "--out", str(tmp_path / "run")]
    args += sum((["--set", s] for s in settings(digits, 4, warmup_steps=20, log_every=2)), [])
    monkeypatch.setenv("VMOE_PROGRESS_INTERVAL", "0")  # a line at every step, even in a sub-second run
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "train.warmup_steps=20 capped to 2, half of the 4 steps" in result.stderr
    assert re.search(r"^training: 4/4 \(100%\) [\d.]+ steps/s, [\d.]+ s$", result.stderr, re.MULTILINE)  # a log's
    assert [r["lr"] for r in metrics(tmp_path / "run") if "loss" in r][0] == cfg.lr  # step 2: the peak


def test_two_cpu_processes_train_evaluate_once_and_resume(digits, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "-m", "vmoe_cli.cli"]
    args = ["pretrain", str(RECIPE), "--out", str(run)]
    args += sum((["--set", s] for s in settings(digits, 10, checkpoint_every=5)), [])
    subprocess.run(torchrun + args, check=True, capture_output=True, env=env, cwd=ROOT, timeout=120)
    evals = [r for r in metrics(run) if "eval_top1" in r]
    assert len(evals) == 1 and evals[0]["eval_total"] == 180  # every minival sample once over both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step_00000005", "step_00000010"]

    more = args + ["--set", "train.steps=15", "--resume", "latest"]
    subprocess.run(torchrun + more, check=True, capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [5, 10, 15]


def test_fsdp_on_two_cpu_processes_matches_ddp_and_resumes_exactly(digits, tmp_path):
    """FSDP2 (parameters sharded over 2 gloo ranks) trains the same model as DDP, and resumes to the bit."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "-m", "vmoe_cli.cli"]

    def run(name: str, *extra: str) -> Path:
        args = ["pretrain", str(RECIPE), "--out", str(tmp_path / name), *extra]
        args += sum((["--set", s] for s in settings(digits, 10, checkpoint_every=5, eval_every=5)), [])
        done = subprocess.run(torchrun + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("2 x cpu, FSDP2" if "train.fsdp=true" in extra else "2 x cpu, DDP") in done.stderr
        return tmp_path / name / "checkpoints"

    fsdp = run("fsdp", "--set", "train.fsdp=true")
    ddp = run("ddp")
    a, b = (
        load_file(fsdp / "step_00000010" / "model.safetensors"),
        load_file(ddp / "step_00000010" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for name in a:  # gathered full tensors; reduce-scatter and all-reduce round differently
        # The key part of qkv.bias has a zero true gradient (softmax ignores a per-query constant), so Adam
        # turns either run's rounding noise into full-size steps: only bounded by steps x lr there.
        atol = 10 * 0.003 if name.endswith("qkv.bias") else 1e-4
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-3, msg=name)
    losses = [[r["loss"] for r in metrics(tmp_path / n) if "loss" in r] for n in ("fsdp", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert [r["eval_total"] for r in metrics(tmp_path / "fsdp") if "eval_top1" in r] == [180, 180]

    (fsdp.parent / "final").mkdir()
    os.replace(fsdp / "step_00000010", fsdp.parent / "final" / "step_00000010")
    run("fsdp", "--set", "train.fsdp=true", "--resume", str(fsdp / "step_00000005"))
    assert weights_digest(fsdp / "step_00000010") == weights_digest(fsdp.parent / "final" / "step_00000010")


def test_tensorboard_events_mirror_metrics_and_resume_purges_the_killed_tail(digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = load_recipe(RECIPE, settings(digits, 10, checkpoint_every=5, eval_every=5, tensorboard=True))
    pretrain(recipe, run)
    pretrain(recipe, run, resume=str(run / "checkpoints" / "step_00000005"))  # steps 6-10 again
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    loss = [(e.step, e.value) for e in board.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]
    assert [s for s, _ in loss] == [5, 10] == [s for s, _ in expected]  # step 10 once: the first one was purged
    assert [e.step for e in board.Scalars("eval_top1")] == [5, 10]
    assert [v for _, v in loss] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "moe3/expert_load/3" in board.Tags()["scalars"] and "eval_top1" in board.Tags()["scalars"]


def test_grad_accum_of_two_halves_equals_one_full_batch(digits, tmp_path):
    """Without router noise, 2 micro-batches of 32 take the same step as one batch of 64 (same images)."""
    base = settings(digits, 6, batch_size=64, checkpoint_every=6) + ["model.moe.noise_std=0"]
    pretrain(load_recipe(RECIPE, base), tmp_path / "one")
    pretrain(load_recipe(RECIPE, [*base, "train.grad_accum=2"]), tmp_path / "two")
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_00000006" / "model.safetensors")
    for name in a:
        atol = 10 * 0.003 if name.endswith("qkv.bias") else 1e-5  # zero-gradient key bias: see the FSDP test
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)
    assert not torch.equal(a["head.weight"], torch.zeros_like(a["head.weight"]))


def test_bf16_mixup_and_sigmoid_loss_train_and_checkpoint(digits, tmp_path):
    extra = ["train.mixed_precision=bf16", "train.loss=sigmoid", "data.augment.mixup=0.2"]
    result = pretrain(load_recipe(RECIPE, settings(digits, 20) + extra), tmp_path / "run")
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert 0 <= result["eval_top1"] <= 1 and result["eval_total"] == 180
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_00000020" / "model.safetensors")
    assert weights["head.weight"].dtype == torch.float32  # autocast computes in bf16, parameters stay fp32


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++"))), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_step_follows_eager_and_saves_the_same_keys(digits, tmp_path):
    """train.compile=true trains the same model: losses close to eager's, checkpoints with the eager names."""
    base = settings(digits, 10, checkpoint_every=10) + ["model.moe.noise_std=0"]
    pretrain(load_recipe(RECIPE, base), tmp_path / "eager")
    torch._dynamo.reset()
    pretrain(load_recipe(RECIPE, [*base, "train.compile=true"]), tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step did run compiled
    eager, compiled = (metrics(tmp_path / name) for name in ("eager", "compiled"))
    losses = [[r["loss"] for r in records if "loss" in r] for records in (eager, compiled)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert compiled[-1]["eval_top1"] == pytest.approx(eager[-1]["eval_top1"], abs=0.02)
    a = load_file(tmp_path / "eager" / "checkpoints" / "step_00000010" / "model.safetensors")
    b = load_file(tmp_path / "compiled" / "checkpoints" / "step_00000010" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-3, rtol=1e-3, msg=name)


def test_compile_without_a_cpp_compiler_stops_with_one_line(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or c++ on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(VmoeError, match="train.compile needs a C\\+\\+ compiler"):
        pretrain(load_recipe(RECIPE, [*settings(digits, 2), "train.compile=true"]), tmp_path / "run")
