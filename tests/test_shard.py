"""`vmoe shard` and `vmoe shard-info`: sources, the shard format, bad inputs, resuming after a kill."""

import gzip
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from processes import any_running, children

from vmoe_cli.cli import main
from vmoe_cli.data.manifest import shard_info
from vmoe_cli.data.shard import RERUN, ShardOptions, write_shards
from vmoe_cli.data.sources import FASHION_MNIST_CLASSES, open_source

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _read_back(out: Path, split: str) -> list[dict]:
    """Every sample of a split, read by the stock webdataset library in shard order (raw bytes)."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / shard["file"]) for shard in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def _image(path: Path, size: tuple[int, int], color: tuple[int, int, int], fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/ and dog/ with 3 good images each, plus a truncated JPEG, a zero-byte file and a text file."""
    root = tmp_path / "pets"
    for label, name in enumerate(["cat", "dog"]):
        for i in range(3):
            fmt = "PNG" if i % 2 else "JPEG"
            _image(root / name / f"{i}.{fmt.lower()}", (12 + i, 10), (40 * i, 100 * label, 7), fmt)
    good = (root / "cat" / "0.jpeg").read_bytes()
    (root / "cat" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image\n")
    return root


BAD_REASONS = {"cat/broken.jpg": "truncated", "dog/empty.png": "zero-byte", "dog/notes.txt": "not an image"}


def test_digits_round_trip_every_pixel_and_label(tmp_path: Path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest = write_shards(open_source("digits"), tmp_path, ShardOptions(shard_size=500))
    assert manifest["splits"]["train"]["count"] == 1797
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [500, 500, 500, 297]
    assert json.loads((tmp_path / "sizes.json").read_text())["train-000003.tar"] == 297
    samples = _read_back(tmp_path, "train")
    assert [s["__key__"] for s in samples] == [f"train_{n:08d}" for n in range(1797)]
    seen = set()
    for sample in samples:
        meta = json.loads(sample["json"])
        index = int(meta["id"].removeprefix("digits:"))
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), np.rint(digits.images[index] * 255 / 16))
        assert int(sample["cls"]) == meta["label"] == digits.target[index]
        assert meta["label_name"] == str(digits.target[index])
        seen.add(index)
    assert seen == set(range(1797))
    names = subprocess.run(["tar", "tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True)
    assert names.stdout.splitlines()[:3] == ["train_00000000.png", "train_00000000.cls", "train_00000000.json"]


def test_minival_is_a_seeded_hold_out_of_train(tmp_path: Path):
    source = open_source("digits")
    a = write_shards(source, tmp_path / "a", ShardOptions(minival=0.1, seed=3))
    b = write_shards(source, tmp_path / "b", ShardOptions(minival=0.1, seed=4))
    assert a["splits"]["minival"]["count"] == 180 and a["splits"]["train"]["count"] == 1617
    ids = {split: {json.loads(s["json"])["id"] for s in _read_back(tmp_path / "a", split)} for split in a["splits"]}
    assert not ids["train"] & ids["minival"] and len(ids["train"] | ids["minival"]) == 1797
    assert a["splits"]["minival"]["shards"][0]["sha256"] != b["splits"]["minival"]["shards"][0]["sha256"]


def test_folder_source_skips_and_reports_bad_files_and_keeps_the_rest(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    manifest = write_shards(open_source(str(folder)), out, ShardOptions(shard_size=4))
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["count"] == 6 and manifest["skipped"] == 3
    assert manifest["splits"]["train"]["class_counts"] == {"cat": 3, "dog": 3}
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {entry["id"]: entry["reason"] for entry in report}.keys() == BAD_REASONS.keys()
    for entry in report:
        assert BAD_REASONS[entry["id"]] in entry["reason"]
    samples = _read_back(out, "train")
    assert len({s["__key__"] for s in samples}) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        ext = "png" if meta["id"].endswith(".png") else "jpg"
        assert sample[ext] == (folder / meta["id"]).read_bytes()  # "keep": the original bytes
        assert meta["label_name"] == meta["id"].split("/")[0] and int(sample["cls"]) == meta["label"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_list_source_skips_missing_corrupt_and_empty_entries(folder: Path, suffix: str):
    rows = [("cat/0.jpeg", "cat", "train"), ("cat/1.png", "cat", "test"), ("dog/0.jpeg", "dog", "train")]
    rows += [("dog/2.jpeg", "dog", "train"), ("cat/broken.jpg", "cat", "train"), ("dog/empty.png", "dog", "train")]
    rows += [("dog/gone.png", "dog", "train")]
    listing = folder / f"list{suffix}"
    if suffix == ".jsonl":
        listing.write_text("".join(json.dumps({"path": p, "label": c, "split": s}) + "\n" for p, c, s in rows))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        listing.write_text("".join(sep.join(row) + "\n" for row in [("path", "label", "split"), *rows]))
    out = folder.parent / "out"
    manifest = write_shards(open_source(str(listing)), out, ShardOptions())
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["count"] == 3 and manifest["splits"]["test"]["count"] == 1
    report = {json.loads(line)["id"]: json.loads(line)["reason"] for line in (out / "skipped.jsonl").open()}
    assert report == {"cat/broken.jpg": report["cat/broken.jpg"], "dog/empty.png": "zero-byte file",
                      "dog/gone.png": "missing file"}  # fmt: skip
    assert [json.loads(s["json"])["id"] for s in _read_back(out, "test")] == ["cat/1.png"]


KILLED_RUN = """
import sys, time
from vmoe_cli.data import shard
from vmoe_cli.data.sources import open_source
encode = shard.encode_image
shard.encode_image = lambda item, options: (time.sleep(0.004), encode(item, options))[1]
shard.write_shards(open_source("digits"), sys.argv[1], shard.ShardOptions(shard_size=40, minival=0.05))
"""


def test_kill_during_sharding_then_rerun_gives_the_uninterrupted_manifest(tmp_path: Path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(killed)])
    deadline = time.monotonic() + 60
    while len(list(killed.glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it was killed"
    finished_before = len(list(killed.glob("*.tar")))

    options = ShardOptions(shard_size=40, minival=0.05)
    calls, said = [], []
    resumed = write_shards(
        open_source("digits"), killed, options, progress=lambda *call: calls.append(call), say=said.append
    )
    assert {what for what, _, _ in calls} == {"writing"}  # the plan was kept: no listing, no planning again
    assert calls[0][1] >= 40 * (finished_before - 1)  # finished shards were kept, not redone
    assert re.fullmatch(r"resuming: \d+ of 46 shards already written", said[0])
    assert resumed == write_shards(open_source("digits"), clean, options, workers=2)
    assert (killed / "manifest.json").read_text() == (clean / "manifest.json").read_text()
    assert not list(killed.glob("*.tmp")) and not (killed / ".vmoe-shard").exists()
    keys = [s["__key__"] for split in ("train", "minival") for s in _read_back(killed, split)]
    assert len(keys) == len(set(keys)) == 1797


FULL_DISK_RUN = """
import resource, signal, sys
from vmoe_cli.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
main(["shard", "digits", "--out", sys.argv[1], "--shard-size", "200", "--workers", sys.argv[2]])
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_write_leaves_no_temp_file_and_a_rerun_finishes(tmp_path: Path, workers: int):
    """A real write failure (the kernel's file-size limit: every ~600 kB shard fails past 200 kB) mid-shard."""
    out = tmp_path / "out"
    run = [sys.executable, "-c", FULL_DISK_RUN, str(out), str(workers)]
    failed = subprocess.run(run, capture_output=True, text=True, timeout=300)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]  # the rest: progress lines
    assert failed.returncode == 2 and failed.stderr.splitlines()[-1:] == errors, failed.stderr
    assert "Traceback" not in failed.stderr
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.tar"))
    shard = rf"{re.escape(str(out))}/train-00000\d\.tar"
    assert re.fullmatch(rf"error: {shard}: cannot write \(File too large\); {re.escape(RERUN)}", errors[0])
    rerun = CliRunner().invoke(main, ["shard", "digits", "--out", str(out), "--shard-size", "200", "--workers", "2"])
    assert rerun.exit_code == 0 and (out / "manifest.json").is_file() and not list(out.glob("*.tmp"))


def _slow_job(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`vmoe shard` with 2 workers, started and waited for until both are mid-shard (seconds per shard)."""
    Image.new("L", (3000, 3000), 90).save(tmp_path / "big.png")  # ~40 ms to decode: shards of 50 take seconds
    (tmp_path / "list.csv").write_text("path,label\n" + "big.png,a\n" * 200)
    out = tmp_path / "out"
    args = ["shard", str(tmp_path / "list.csv"), "--out", str(out), "--shard-size", "50", "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-c", "from vmoe_cli.cli import main; main()", *args, "--validate", "full"]
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar.*.tmp"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(out.glob("*.tar.*.tmp"))) == 2 and not list(out.glob("*.tar")), "both workers mid-shard"
    return process, out


def test_ctrl_c_of_a_pool_removes_the_temp_files_of_the_killed_workers(tmp_path: Path):
    """Stopping the pool kills its workers mid-shard (no cleanup of their own): the parent removes their temps."""
    process, out = _slow_job(tmp_path)
    process.send_signal(signal.SIGINT)  # the parent only, as a terminal's Ctrl-C reaches it (workers ignore it)
    assert process.wait(timeout=60) == 130
    assert not list(out.glob("*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the workers in /proc")
def test_kill_9_of_the_main_process_leaves_no_worker(tmp_path: Path):
    """The workers, busy mid-shard, die with the main process (their shards would take seconds more)."""
    process, out = _slow_job(tmp_path)
    workers = children(process.pid)
    assert len(workers) >= 2
    process.kill()
    process.wait()
    assert not any_running(workers), "a worker outlived the main process"


def test_shard_bytes_bounds_each_shard(tmp_path: Path):
    manifest = write_shards(open_source("digits"), tmp_path, ShardOptions(shard_bytes=100_000, limit=300))
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["bytes"] <= 100_000 for s in shards)
    assert sum(s["count"] for s in shards) == 300


def test_resize_and_reencode_to_jpg(tmp_path: Path):
    _image(tmp_path / "src" / "a" / "wide.png", (40, 20), (200, 10, 10), "PNG")
    _image(tmp_path / "src" / "a" / "small.png", (8, 6), (10, 200, 10), "PNG")
    write_shards(open_source(str(tmp_path / "src")), tmp_path / "out", ShardOptions(encoding="jpg", resize=10))
    sizes = {json.loads(s["json"])["id"]: Image.open(io.BytesIO(s["jpg"])).size
             for s in _read_back(tmp_path / "out", "train")}  # fmt: skip
    assert sizes == {"a/wide.png": (20, 10), "a/small.png": (8, 6)}


def test_cli_refuses_a_different_job_and_resumes_the_same(tmp_path: Path):
    out = str(tmp_path / "out")
    args = ["shard", "digits", "--out", out, "--limit", "60", "--shard-size", "25", "--workers", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already complete" in again.stdout
    other = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert other.exit_code == 2
    assert (
        other.stderr
        == f"error: {out}: holds shards of a different job (--seed was 0, now 1); pass --overwrite or another --out\n"
    )
    assert CliRunner().invoke(main, [*args, "--seed", "1", "--overwrite"]).exit_code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["seed"] == 1


def test_cli_one_line_errors(tmp_path: Path, folder: Path):
    cases = {
        (str(tmp_path / "nope"),): "no such file or folder",
        (str(folder / "cat" / "0.jpeg"),): "a list file must end in .csv, .tsv or .jsonl",
        ("digits", "--minival", "1.5"): "--minival must be in [0, 1)",
        ("digits", "--shard-bytes", "lots"): "--shard-bytes: expected a size",
        ("digits", "--class-names", "a,b"): "--class-names: digits has 10 classes, got 2 names",
    }
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("hello")
    for extra, message in cases.items():
        result = CliRunner().invoke(main, ["shard", *extra[:1], "--out", str(tmp_path / "o"), *extra[1:]])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    result = CliRunner().invoke(main, ["shard", "digits", "--out", str(tmp_path / "foreign")])
    assert result.exit_code == 2 and "not written by `vmoe shard`" in result.stderr


def test_threshold_fails_then_a_higher_one_finishes_without_redoing(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["shard", str(folder), "--out", str(out), "--workers", "1", "--max-skipped", "0.2"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 2 and failed.stderr.count("\n") == 1
    assert "3 of 9 inputs were skipped, more than --max-skipped 0.2" in failed.stderr
    assert not (out / "manifest.json").exists() and (out / "skipped.jsonl").read_text().count("\n") == 3
    finished = CliRunner().invoke(main, [*args[:-1], "0.5"])
    assert finished.exit_code == 0 and "; 0 images read in " in finished.stdout
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "empty.png").write_bytes(b"")
    nothing = CliRunner().invoke(main, ["shard", str(tmp_path / "bad"), "--out", str(tmp_path / "o2")])
    assert nothing.exit_code == 2 and "no usable image: all 1 inputs were skipped" in nothing.stderr


def test_a_rerun_says_where_it_resumes_and_counts_only_its_own_images(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["shard", str(folder), "--out", str(out), "--workers", "1", "--shard-size", "2", "--max-skipped", "0.2"]
    assert CliRunner().invoke(main, args).exit_code == 2  # all 5 shards written, then too many skipped: state kept
    (out / "train-000001.tar").unlink()
    rerun = CliRunner().invoke(main, [*args[:-1], "0.5"])
    assert rerun.exit_code == 0, rerun.output
    assert "resuming: 4 of 5 shards already written\n" in rerun.stderr
    assert "; 2 images read in " in rerun.stdout  # the rewritten shard's, not all 9


def test_dry_run_counts_and_writes_nothing(folder: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["shard", str(folder), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "3 inputs skipped" in result.stdout and "skipped cat/broken.jpg: truncated" in result.stdout
    assert not (tmp_path / "o").exists()


def test_shard_info_counts_flags_and_verifies(tmp_path: Path):
    write_shards(open_source("digits"), tmp_path, ShardOptions(shard_size=500, minival=0.05))
    info = shard_info(tmp_path, verify=True, ranks=2, workers=8)
    assert info["failed"] == []
    assert info["problems"] == [  # minival, read by sample (data/loader.py: _eval_range), is never divided by shard
        "train: 4 shards for 2 ranks x 8 workers: 12 readers get no shard (use fewer workers, or reshard with a "
        "smaller --shard-size)",
        "train: samples per rank range from 707 to 1000",
    ]
    result = CliRunner().invoke(main, ["shard-info", str(tmp_path), "--ranks", "2", "--workers", "8"])
    assert result.exit_code == 0 and "train:" in result.stderr and "minival" not in result.stderr
    result = CliRunner().invoke(main, ["shard-info", str(tmp_path), "--verify"])
    assert result.exit_code == 0 and "5 shards verified" in result.stdout
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["shard-info", str(tmp_path)]).exit_code == 0  # sizes only
    result = CliRunner().invoke(main, ["shard-info", str(tmp_path), "--verify"])
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "1 shard(s) failed verification: train-000001.tar: sha256 differs from the manifest's\n"
    )
    missing = CliRunner().invoke(main, ["shard-info", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no manifest.json" in missing.stderr


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=f"{FASHION_MNIST} is absent (Debian: dataset-fashion-mnist)")
def test_fashion_mnist_slice(tmp_path: Path):
    args = ["shard", str(FASHION_MNIST), "--out", str(tmp_path), "--limit", "20", "--minival", "0.01", "--workers", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["classes"] == FASHION_MNIST_CLASSES
    assert {split: info["count"] for split, info in manifest["splits"].items()} == {
        "train": 20,
        "minival": 20,
        "test": 20,
    }
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    for sample in _read_back(tmp_path, "test"):
        meta = json.loads(sample["json"])
        assert meta["id"].startswith("t10k-images-idx3-ubyte.gz:")
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        np.testing.assert_array_equal(pixels, images[int(meta["id"].split(":")[1])])
        assert meta["label_name"] == FASHION_MNIST_CLASSES[meta["label"]]
    assert tarfile.is_tarfile(tmp_path / "test-000000.tar")
