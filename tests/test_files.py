"""Files: everything vmoe writes is readable as the umask allows, a failing write leaves no temp file, and the
temp files of a killed writer are removed by the next run while those of live writers are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vmoe_cli.atomic import PID_SPACE, write_bytes_atomic, write_text_atomic
from vmoe_cli.checkpoint import save_checkpoint
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.eval.fewshot import load_backbone
from vmoe_cli.eval.probe import dataset_features
from vmoe_cli.eval.sweep import GridPoint, SweepOptions, sweep
from vmoe_cli.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits-vmoe.yaml"


@pytest.fixture
def umask() -> Iterator[None]:
    """The usual umask, 022, for the test; the process's own afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, set[str]]:
    """The permission bits (octal) of every file and folder below `root`, with the paths having them."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*"):
        kind = "folder" if path.is_dir() else "file"
        found.setdefault(f"{kind} {path.stat().st_mode & 0o777:o}", set()).add(str(path.relative_to(root)))
    return found


def save_random_vmoe(run: Path) -> Path:
    """An untrained digits V-MoE saved as a run's checkpoint."""
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    save_checkpoint(run, 1, VisionTransformer(recipe.model).state_dict(), recipe, {}, keep_last=1)
    return run


def test_a_run_and_its_resume_write_files_readable_as_the_umask_allows(umask, digits, tmp_path):
    run = tmp_path / "run"
    settings = [f"data.shards={digits}", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=1"]
    args = ["pretrain", str(RECIPE), "--out", str(run), *sum((["--set", s] for s in settings), [])]
    assert CliRunner().invoke(main, [*args, "--set", "train.steps=1"]).exit_code == 0
    resumed = CliRunner().invoke(main, [*args, "--set", "train.steps=2", "--resume", "latest"])
    assert resumed.exit_code == 0, resumed.output  # the resume rewrites metrics.jsonl and config.yaml
    found = modes(run)
    assert set(found) == {"file 644", "folder 755"}, found
    assert {"config.yaml", "metrics.jsonl", "checkpoints/last"} <= found["file 644"]


def test_evaluation_results_and_caches_are_readable_as_the_umask_allows(umask, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    fewshot = ["fewshot", "digits", "--checkpoint", "pixels", "--pixels-size", "8", "--shots", "1", "--seeds", "1"]
    result = CliRunner().invoke(main, [*fewshot, "--cache-dir", str(cache), "--out", str(out / "fewshot.json")])
    assert result.exit_code == 0, result.output
    run = save_random_vmoe(tmp_path / "run")
    args = ["sweep-capacity", "digits", "--checkpoint", str(run), "--out", str(out / "sweep"), "--k", "2"]
    args += ["--capacity", "1", "--bpr", "off", "--batch-size", "64", "--throughput-batch", "8", "--repeats", "1"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    found = modes(tmp_path)
    assert set(found) == {"file 644", "folder 755"}, found
    written = {"fewshot.json", "fewshot.csv", "sweep/sweep.json", "sweep/sweep.csv", "sweep/sweep-state.json"}
    assert {f"out/{name}" for name in written} <= found["file 644"]
    assert any(name.startswith("cache/features/") for name in found["file 644"])


@pytest.mark.parametrize(("mask", "mode"), [(0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_an_atomic_write_follows_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_a_failing_write_removes_its_temp_file(tmp_path):
    (tmp_path / "taken" / "inside").mkdir(parents=True)  # a non-empty folder cannot be renamed over
    with pytest.raises(OSError):
        write_bytes_atomic(tmp_path / "taken", b"data")
    with pytest.raises(TypeError):
        write_bytes_atomic(tmp_path / "text", "not bytes")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


WRITER = """
import sys, time
from pathlib import Path
from vmoe_cli.atomic import _open_temp
for target in sys.argv[1:]:
    print(_open_temp(Path(target))[1], flush=True)
time.sleep(120)
"""


def start_writer(*targets: Path) -> tuple[subprocess.Popen, list[Path]]:
    """A process that has begun an atomic write of each target (its temp files exist) and is still writing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, *map(str, targets)], stdout=subprocess.PIPE, env=env)
    return process, [Path(process.stdout.readline().decode().strip()) for _ in targets]


def test_a_killed_writers_temp_files_are_removed_by_the_next_run(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "sweep"
    data = str(eval_shards("digits", cache))
    (cache / "features").mkdir()
    out.mkdir()
    killed, dead = start_writer(cache / "features" / "x.npz", out / "sweep-state.json")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live, alive = start_writer(cache / "features" / "y.npz", out / "sweep.json")
    try:
        other = f"{'0' * 8}-{killed.pid}.0123abcd.tmp"  # another host's or container's: its pid means nothing here
        kept = [cache / "features" / ".notes.tmp", out / f".a.json.{other}"]
        old = out / f".b.json.{other}"  # the same, two days old
        for path in [*kept, old]:
            path.write_text("x")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        assert all(path.is_file() for path in dead) and PID_SPACE != "0" * 8

        dataset_features(load_backbone("pixels", pixels_size=8), data, cache)
        sweep(save_random_vmoe(tmp_path / "run"), data, [GridPoint(2, 1.0, False)], out,
              SweepOptions(batch_size=64, throughput_batch=8, repeats=1, warmup=0), cache_dir=cache)  # fmt: skip
        assert not any(path.exists() for path in [*dead, old])
        assert all(path.is_file() for path in [*alive, *kept])
    finally:
        live.kill()
        live.wait()
