"""One writer per run directory (real processes, kill -9), and one-line errors for output paths that cannot be
written, given before any work is done."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmoe_cli.cli import main
from vmoe_cli.errors import VmoeError
from vmoe_cli.outputs import LOCK, run_lock

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-vmoe.yaml"
HOLD = """
import os, sys, time
from vmoe_cli.outputs import run_lock
with run_lock(sys.argv[1]):
    child = os.fork() if len(sys.argv) > 2 else None  # a child, as a data-loader worker is: it must not keep the lock
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("held", child or "", flush=True)
    time.sleep(60)
"""


def hold(run: Path, fork: bool = False) -> tuple[subprocess.Popen, int]:
    """Another process holding `run`'s lock through the function every command uses, until it is killed; and
    the pid of its forked child (with `fork`)."""
    args = [sys.executable, "-c", HOLD, str(run), *(["fork"] if fork else [])]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    held, *child = holder.stdout.readline().split()
    assert held == "held"
    return holder, int(child[0]) if child else 0


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def pretrain_args(digits: Path, run: Path, steps: int) -> list[str]:
    overrides = [f"data.shards={digits}", f"train.steps={steps}", "train.eval_every=0", "train.warmup_steps=1"]
    return ["pretrain", str(RECIPE), "--out", str(run), *sum((["--set", s] for s in overrides), [])]


def test_a_second_writer_stops_with_the_holders_pid_and_kill_9_leaves_no_stale_lock(digits, tmp_path):
    run = tmp_path / "run"
    holder, _ = hold(run)
    try:
        busy = f"error: {run}: another vmoe process (pid {holder.pid}) is writing here; "
        busy += "wait for it or choose another --out\n"
        result = CliRunner().invoke(main, pretrain_args(digits, run, 2))
        assert (result.exit_code, result.stderr) == (2, busy)
        sweep = ["sweep-capacity", str(digits), "--checkpoint", str(run), "--out", str(run)]
        result = CliRunner().invoke(main, sweep)
        assert (result.exit_code, result.stderr) == (2, busy)
        assert [p.name for p in run.iterdir()] == [LOCK]  # neither wrote anything
    finally:
        kill(holder)
    result = CliRunner().invoke(main, pretrain_args(digits, run, 2))
    assert result.exit_code == 0, result.output
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last").is_file()


def test_a_running_pretrain_holds_its_run_directory_until_killed(digits, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "vmoe_cli.cli", *pretrain_args(digits, run, 100_000)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not (run / "config.yaml").exists():  # written under the lock, once the run is set up
            assert process.poll() is None, "the pretrain ended early"
            time.sleep(0.05)
        busy = f"another vmoe process \\(pid {process.pid}\\) is writing here"
        with pytest.raises(VmoeError, match=busy), run_lock(run):
            pass
    finally:
        kill(process)
    with run_lock(run):
        pass


def test_a_forked_child_outliving_the_holder_does_not_keep_the_lock(tmp_path):
    holder, child = hold(tmp_path, fork=True)
    kill(holder)  # its child sleeps on, with copies of every fd the holder had
    try:
        with run_lock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_nested_lock_in_the_same_process_keeps_the_outer_one(tmp_path):
    def locked_by_another() -> bool:
        fd = os.open(tmp_path / LOCK, os.O_RDWR)  # a new open file: flock treats it as another holder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    with run_lock(tmp_path):
        with run_lock(tmp_path):
            pass
        assert locked_by_another()
    assert not locked_by_another()


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("kept\n")
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["pretrain", str(RECIPE), "--set", "train.steps=1", "--out", "{out}"],
        ["finetune", str(RECIPE), "--from", "no-such-run", "--out", "{out}"],
        ["sweep-capacity", "digits", "--checkpoint", "no-such-run", "--out", "{out}"],
        ["convert-jax", "no-such-prefix", "--out", "{out}"],
        ["quickstart", "--out", "{out}"],
    ],
    ids=lambda c: c[0],
)
def test_an_output_folder_that_is_a_file_or_under_one_is_one_line(command, tmp_path):
    file = a_file(tmp_path)
    for out, why in ((file, "is a file"), (file / "run", f"{file} is a file")):
        result = CliRunner().invoke(main, [a.replace("{out}", str(out)) for a in command])
        assert (result.exit_code, result.stderr) == (
            2,
            f"error: --out {out}: {why}, not a folder; choose another --out\n",
        )
    assert file.read_text() == "kept\n"


@pytest.mark.parametrize(
    "command",
    [
        ["fewshot", "digits", "--checkpoint", "pixels", "--shots", "1", "--seeds", "1", "--out", "{out}"],
        ["superclasses", "digits", "--checkpoint", "no-such-run", "--experts", "2", "--out", "{out}"],
    ],
    ids=lambda c: c[0],
)
def test_an_output_file_under_a_file_or_on_a_folder_is_one_line_before_any_work(command, tmp_path):
    file, cache = a_file(tmp_path), tmp_path / "cache"
    command = [*command, "--cache-dir", str(cache)]
    for out, why in ((file / "x.json", f"{file} is a file, not a folder; choose another --out"),
                     (tmp_path, f"is a folder; give a file name, e.g. {tmp_path / 'results.json'}")):  # fmt: skip
        result = CliRunner().invoke(main, [a.replace("{out}", str(out)) for a in command])
        assert (result.exit_code, result.stderr) == (2, f"error: --out {out}: {why}\n")
    assert not cache.exists()  # digits was never sharded into the cache, no feature extracted


def test_a_read_only_output_folder_is_one_line(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    try:
        (folder / "probe").touch()
        pytest.skip("this user writes through read-only permissions (root)")
    except PermissionError:
        pass
    out = folder / "run"
    result = CliRunner().invoke(main, ["pretrain", str(RECIPE), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr == f"error: --out {out}: cannot write in {folder} (Permission denied); choose another --out\n"
