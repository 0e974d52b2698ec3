"""Progress of long phases (vmoe_cli/progress.py): plain lines with rate and ETA in a log, a bar on a terminal,
and tables printed whole when the output is not a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vmoe_cli import progress
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
from vmoe_cli.errors import VmoeError
from vmoe_cli.progress import INTERVAL_ENV, Display, Phase

ROOT = Path(__file__).resolve().parents[1]
EVERY_VALUE = {**os.environ, INTERVAL_ENV: "0", "PYTHONPATH": str(ROOT)}  # a plain line for every value shown


def vmoe(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, stdout and stderr to pipes (not terminals), as in a cluster job's log."""
    command = [sys.executable, "-m", "vmoe_cli.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=EVERY_VALUE, cwd=ROOT, timeout=120)


def test_status_counts_the_rate_from_the_first_value_seen():
    """A phase first seen at 5,000 (a resumed job) reports this run's rate, not 5,100 images in one second."""
    phase = Phase(total=10_000, unit="images", first=5_000, start=100.0, done=5_100)
    assert phase.status(101.0) == "5,100/10,000 (51%) 100 images/s, ETA 49 s"
    phase.done = 10_000
    assert phase.status(150.0) == "10,000/10,000 (100%) 100 images/s, 50 s"  # the time taken replaces the ETA
    assert Phase(None, "shards", 0, 0.0, 12).status(4.0) == "12 shards, 3 shards/s"  # no total: no ETA
    assert Phase(4_000_000, "bytes", 0, 0.0, 1_500_000).status(0.5) == "1.5 MB/4.0 MB (37%) 3.0 MB/s, ETA 0.8 s"


def test_plain_lines_every_interval_and_final(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    with Display(Console(file=log), interval=10) as show:
        for second in range(21):  # 50 images a second for 20 s
            show("features fmnist test", 50 * second, 1000)
            clock[0] += 1.0
        show("quick", 5, 5)  # over at once: no line
        show("timing", 1, 4, "settings")
        clock[0] += 2.0
        show("timing", 2, 4, "settings")  # stops before its total: the closing line
    assert log.getvalue().splitlines() == [
        "features fmnist test: 500/1,000 (50%) 50 images/s, ETA 10 s",
        "features fmnist test: 1,000/1,000 (100%) 50 images/s, 20 s",
        "timing: 2/4 (50%) 0.5 settings/s, ETA 4.0 s",
    ]

    log = io.StringIO()
    with pytest.raises(VmoeError), Display(Console(file=log), interval=10) as show:
        show("features fmnist test", 0, 1000)
        clock[0] += 12.0
        show("features fmnist test", 100, 1000)
        raise VmoeError("a bad shard")
    assert log.getvalue() == "features fmnist test: 100/1,000 (10%) 8.33 images/s, ETA 1 min 48 s\n"  # then the error


def test_terminal_draws_a_bar_with_rate_and_eta():
    screen = io.StringIO()
    with Display(Console(file=screen, force_terminal=True, width=120), interval=0) as show:
        show("features fmnist test", 0, 1000)
        show("features fmnist test", 400, 1000)
        show.echo("a line above the bar")
        show("features fmnist test", 1000, 1000)
    out = screen.getvalue()
    assert "\x1b[" in out and "━" in out  # drawn, with ANSI codes
    assert "a line above the bar" in out and "1,000/1,000 (100%)" in out and "images/s" in out
    assert "features fmnist test:" not in out  # no plain lines on a terminal


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert Display().interval == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(VmoeError, match=f"{INTERVAL_ENV}: expected the seconds between progress lines"):
        Display()


def test_shard_info_in_a_log_prints_whole_cells_and_progress_lines(tmp_path):
    """`shard-info --verify` piped: every long class name whole in the table, and a hashing line per shard."""
    names = [f"class {i} with a name far longer than any terminal " + "is wide " * 20 for i in range(10)]
    shards = tmp_path / "shards"
    write_shards(open_source("digits", class_names=names), shards, ShardOptions(shard_size=100, limit=300), workers=1)
    done = vmoe("shard-info", str(shards), "--verify")
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in names)  # not wrapped, not cut
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"sha256 {shards}: ")]
    assert len(lines) == 1 + 3, done.stderr  # the start, then after each of the 3 shards
    assert re.search(r": [\d.]+ [kM]B/[\d.]+ [kM]B \(\d\d%\) [\d.]+ [kMGT]?B/s, ETA [\d.]+ s$", lines[1]), lines
    assert re.search(r"\(100%\) [\d.]+ [kMGT]?B/s, [\d.]+ s$", lines[-1]), lines


def test_fewshot_in_a_log_prints_feature_lines_with_rate(tmp_path):
    done = vmoe("fewshot", "--checkpoint", "pixels", "digits", "--shots", "1", "--seeds", "1", "--pixels-size", "8",
                "--cache-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    train = [line for line in done.stderr.splitlines() if line.startswith("features digits train: ")]
    assert train[0] == "features digits train: 0/1,438 (0%)" and len(train) == 1 + 6  # 6 batches of <= 256
    assert re.fullmatch(r"features digits train: 512/1,438 \(35%\) [\d,.]+ images/s, ETA [\d.]+ s", train[2])
    assert re.fullmatch(r"features digits train: 1,438/1,438 \(100%\) [\d,.]+ images/s, [\d.]+ s", train[-1])
    assert "features digits test: 359/359 (100%)" in done.stderr
