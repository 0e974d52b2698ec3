"""Expert parallelism on CPU processes (gloo): equal to one process, and checkpoints any N can resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import RECIPE, ROOT, VENV_BIN, metrics, settings

from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.expert_parallel import expert_parallel

ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
TOLERANCE = 1e-5  # relative: the largest difference over a tensor / its largest value


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    command = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(processes), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(("world", "n"), [(2, 2), (4, 2), (4, 4)])
def test_expert_parallel_model_equals_the_single_process_model(world, n):
    """(a) every router's outputs and every gradient of one step, also when all tokens go to one rank's experts;
    (b) three steps of SGD with clipping: the weights."""
    done = torchrun(world, "tests/expert_parallel_worker.py", str(n))
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 9 and all(r["world"] == world and r["n"] == n for r in results)
    for r in results:
        for key in ("logits", "grads", "weights"):
            if key in r:
                assert r[key] <= TOLERANCE, r


def test_layouts_that_cannot_work_are_one_line_errors():
    assert expert_parallel(1, None, 3, 0) is None  # N = 1: nothing to set up, any model and world
    with pytest.raises(VmoeError, match="does not divide the 3 processes"):
        expert_parallel(2, 4, 3, 0)
    with pytest.raises(VmoeError, match="does not divide model.moe.num_experts=6"):
        expert_parallel(4, 6, 4, 0)
    with pytest.raises(VmoeError, match="needs a V-MoE"):
        expert_parallel(2, None, 2, 0)
    with pytest.raises(VmoeError, match="train.expert_parallel must be >= 1"):
        load_recipe(RECIPE, ["train.expert_parallel=0"])


def test_checkpoints_hold_every_expert_and_resume_at_any_n(digits, tmp_path):
    """(c) N=2 from scratch == N=2 resumed, to the bit; N=2's checkpoint resumes at N=1 (one process) and N=4,
    and those checkpoints at N=2 again: each run continues and keeps the full [E, ...] layout."""
    run = tmp_path / "run"
    base = ["-m", "vmoe_cli.cli", "pretrain", str(RECIPE)]
    sets = sum((["--set", s] for s in settings(digits, 4, checkpoint_every=2)), [])

    def pretrain(processes: int, n: int, out: Path, *extra: str) -> str:
        args = [*base, "--out", str(out), *sets, "--set", f"train.expert_parallel={n}", *extra]
        return torchrun(processes, *args).stderr

    first = pretrain(2, 2, run)
    assert "2 x cpu, DDP, DP 1 x EP 2" in first  # the first line states the layout
    whole = load_file(run / "checkpoints/step_00000004/model.safetensors")
    experts = {k: v.shape for k, v in whole.items() if ".experts." in k}
    assert experts and all(shape[0] == 4 for shape in experts.values())  # every expert, gathered

    resumed = tmp_path / "resumed"
    step2 = run / "checkpoints/step_00000002"
    pretrain(2, 2, resumed, "--resume", str(step2))
    again = load_file(resumed / "checkpoints/step_00000004/model.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)  # same N: bit-identical

    for processes, n, steps in ((1, 1, 6), (4, 4, 8), (2, 2, 10)):  # N=2 -> N=1 -> N=4 -> N=2
        pretrain(processes, n, run, "--resume", "latest", "--set", f"train.steps={steps}")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_top1" in m] == [4, 6, 8, 10]
    assert all(m["eval_total"] == 180 for m in metrics if "eval_top1" in m)  # every sample once, at every N


def test_launchers_start_the_processes_they_say_or_refuse(digits, tmp_path):
    """The README's CPU launches: accelerate launch really starts 2 processes; a launch whose processes would
    each train alone (no ACCELERATE_USE_CPU on CPU) stops with one line instead of pretending."""
    args = ["pretrain", str(RECIPE), *sum((["--set", s] for s in settings(digits, 2)), [])]
    launch = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "vmoe_cli.cli"]
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=240)  # fmt: skip
    assert done.returncode == 0 and "2 x cpu, DDP; steps 0 -> 2" in done.stderr, done.stderr[-3000:]

    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    command = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "-m", "vmoe_cli.cli", *args]
    done = subprocess.run([*command, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=240)  # fmt: skip
    assert done.returncode != 0 and "launched as 2 processes, but Accelerate joined 1" in done.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_fsdp_with_expert_parallelism_matches_ddp_and_resumes_exactly(digits, tmp_path):
    """(d) FSDP2 shards everything but the experts, which expert parallelism holds: the same model as DDP with
    expert parallelism, a checkpoint in the same full layout, and an exact resume."""
    sets = sum((["--set", s] for s in settings(digits, 6, checkpoint_every=3, expert_parallel=2)), [])

    def pretrain(out: str, *extra: str) -> Path:
        done = torchrun(2, "-m", "vmoe_cli.cli", "pretrain", str(RECIPE), "--out", str(tmp_path / out), *sets, *extra)
        assert ("FSDP2, DP 1 x EP 2" if "train.fsdp=true" in extra else "DDP, DP 1 x EP 2") in done.stderr
        return tmp_path / out / "checkpoints"

    ddp = load_file(pretrain("ddp") / "step_00000006/model.safetensors")
    fsdp_dir = pretrain("fsdp", "--set", "train.fsdp=true")
    fsdp = load_file(fsdp_dir / "step_00000006/model.safetensors")
    assert ddp.keys() == fsdp.keys() and all(fsdp[k].shape[0] == 4 for k in fsdp if ".experts." in k)
    for name in ddp:  # reduce-scatter and all-reduce round differently; Adam magnifies that where the true
        # gradient is zero (attention's key bias), up to steps x lr, as in test_train's FSDP test
        atol = 6 * 0.003 if name.endswith("qkv.bias") else 1e-4
        torch.testing.assert_close(fsdp[name], ddp[name], atol=atol, rtol=1e-3, msg=name)
    losses = [[r["loss"] for r in metrics(tmp_path / n) if "loss" in r] for n in ("fsdp", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=TOLERANCE)
    resumed = pretrain("resumed", "--set", "train.fsdp=true", "--resume", str(fsdp_dir / "step_00000003"))
    again = load_file(resumed / "step_00000006/model.safetensors")
    assert all(torch.equal(fsdp[k], again[k]) for k in fsdp)


def test_two_nodes_over_loopback_form_one_expert_parallel_job(digits, tmp_path):
    """The multi-node launch of the README (--nnodes 2, one --node_rank each, a shared master address), with the
    two 'nodes' on this machine: one job of 2 processes whose experts are split between the nodes."""
    args = ["pretrain", str(RECIPE), "--out", str(tmp_path / "run"), "--set", "train.expert_parallel=2"]
    args += sum((["--set", s] for s in settings(digits, 2)), [])
    node = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--master_addr", "127.0.0.1", "--master_port", "29533"]
    nodes = [
        subprocess.Popen([*node, "--node_rank", str(rank), "--nproc_per_node", "1", "-m", "vmoe_cli.cli", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=240) for process in nodes]
    assert all(process.returncode == 0 for process in nodes), outputs[0][1][-3000:]
    assert "2 x cpu, DDP, DP 1 x EP 2" in outputs[0][1]
    assert [r["eval_total"] for r in metrics(tmp_path / "run") if "eval_top1" in r] == [180]
