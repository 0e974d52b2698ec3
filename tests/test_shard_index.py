"""`vmoe shard-index`: stock webdataset.ShardWriter tars (local, brace patterns, http, pipe:, fsspec) indexed where
they are, then read by the loader, fewshot, sweep-capacity and pretrain; one-line errors; only signed indexes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from processes import any_running, children
from sklearn.datasets import load_digits

from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data import tars as tars_module
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.index import IndexOptions, index_shards, split_of
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.manifest import read_manifest, shard_info
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = "train-{000000..000005}.tar", "test-{000000..000001}.tar"  # 6 x 50 train, 2 x 50 test digits


@pytest.fixture(scope="module", autouse=True)
def config_home(tmp_path_factory) -> Path:
    """This module's user key for signing indexes, away from the real ~/.config."""
    home = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    """400 digits as 8-bit PNGs in stock ShardWriter tars: `.cls` labels in the folder, `.json` labels only
    (key "digit") in json/."""
    root = tmp_path_factory.mktemp("tars")
    (root / "json").mkdir()
    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
    for split, first, last in (("train", 0, 300), ("test", 300, 400)):
        with (
            wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=50, verbose=0) as cls_sink,
            wds.ShardWriter(str(root / "json" / f"{split}-%06d.tar"), maxcount=50, verbose=0) as json_sink,
        ):
            for i in range(first, last):
                png = io.BytesIO()
                Image.fromarray(pixels[i]).save(png, format="PNG")
                label = int(digits.target[i])
                cls_sink.write({"__key__": f"d{i:05d}", "png": png.getvalue(), "cls": label, "txt": "a caption"})
                json_sink.write({"__key__": f"d{i:05d}", "png": png.getvalue(), "json": {"digit": label}})
    return root


@pytest.fixture(scope="module")
def index(tars: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index")
    result = CliRunner().invoke(
        main, ["shard-index", str(tars / TRAIN), str(tars / TEST), "--out", str(out), "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(tars: Path) -> str:
    """A real HTTP server on localhost serving the tars folder."""
    handler = functools.partial(QuietHandler, directory=str(tars))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves the tars folder as /MODE/NAME, failing on purpose. busy: HTTP 503 to the first 2 requests;
    cut: each response stops after 5,000 bytes (Range requests honoured); cut-norange: the same, Range ignored;
    down: HTTP 503 to every request."""

    requests: Counter = Counter()

    def do_GET(self) -> None:
        _, mode, name = self.path.split("/", 2)
        self.requests[mode] += 1
        if mode == "down" or (mode == "busy" and self.requests[mode] <= 2):
            self.send_error(503)
            return
        data = (Path(self.server.root) / name).read_bytes()
        wanted = self.headers.get("Range")
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and mode != "cut-norange" else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(data[start:] if mode == "busy" else data[start : start + 5000])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky(tars: Path, monkeypatch) -> str:
    monkeypatch.setattr(tars_module, "HTTP_WAIT_S", 0.001)
    FlakyHandler.requests.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    httpd.root = str(tars)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_retries_passing_errors_and_resumes_cut_bodies(tars: Path, index: Path, flaky: str, tmp_path: Path):
    """Through a server that answers 503 twice, then one that cuts every body after 5,000 bytes: the same index
    as the local files (sha256 of every byte), by Range requests from where each cut stopped."""
    result = invoke(
        "shard-index", f"{flaky}/busy/test-000000.tar", f"{flaky}/cut/test-000001.tar", "--out", str(tmp_path),
        "--workers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    local = read_manifest(index)["splits"]["test"]["shards"]
    remote = read_manifest(tmp_path)["splits"]["test"]["shards"]
    assert [(s["count"], s["bytes"], s["sha256"]) for s in remote] == [
        (s["count"], s["bytes"], s["sha256"]) for s in local
    ]
    assert FlakyHandler.requests["busy"] == 3 and FlakyHandler.requests["cut"] > local[1]["bytes"] // 5000


def test_http_failures_that_last_are_one_line(flaky: str, tmp_path: Path):
    for mode, message in (
        ("down", f"{flaky}/down/test-000000.tar: cannot connect (HTTP 503 Service Unavailable), 6 tries"),
        ("cut-norange", "the connection broke after 5,000 bytes and the server cannot resume it"),
    ):
        result = invoke("shard-index", f"{flaky}/{mode}/test-000000.tar", "--out", str(tmp_path), "--workers", "1")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.output
    assert FlakyHandler.requests["down"] == tars_module.HTTP_TRIES


def webdataset_samples(urls: list[str]) -> list[tuple[np.ndarray, int]]:
    """What stock webdataset reads from the tars: grey pixels and .cls labels."""
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("png", "cls")
    return [(image, int(label)) for image, label in dataset]


def loader_samples(shards: Path, split: str, **data: object) -> list[tuple[np.ndarray, int]]:
    loader = build_loader(
        shards, split, DataConfig(**data), batch_size=32, image_size=8, channels=1, train=False, raw=True
    )
    return [
        (image[0].numpy(), int(label)) for images, labels in loader for image, label in zip(images, labels, strict=True)
    ]


def train_batches(shards: Path, rank: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_loader(
        shards, "train", DataConfig(workers=2), batch_size=8, image_size=8, channels=1, train=True, rank=rank,
        world_size=2, seed=1, epoch=1, start_batch=start_batch,
    )  # fmt: skip
    return list(loader)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_the_index_counts_and_reads_what_webdataset_reads(tars: Path, index: Path):
    manifest = read_manifest(index)
    assert manifest["format"] == "vmoe-index/1" and manifest["classes"] == [str(i) for i in range(10)]
    shards = manifest["splits"]["train"]["shards"]
    files = sorted(tars.glob("train-*.tar"))
    assert [s["file"] for s in shards] == [str(f) for f in files]  # absolute paths, in the brace pattern's order
    assert [(s["count"], s["bytes"]) for s in shards] == [(50, f.stat().st_size) for f in files]
    assert [s["sha256"] for s in shards] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    for split in ("train", "test"):
        expected = webdataset_samples([str(f) for f in sorted(tars.glob(f"{split}-*.tar"))])
        got = loader_samples(index, split)
        assert len(got) == len(expected) == manifest["splits"][split]["count"]
        assert all(np.array_equal(a, b) and x == y for (a, x), (b, y) in zip(got, expected, strict=True))
        counts = Counter(str(label) for _, label in expected)
        assert manifest["splits"][split]["class_counts"] == {name: counts[name] for name in manifest["classes"]}
    assert [x for _, x in loader_samples(index, "test", cache=True)] == [x for _, x in loader_samples(index, "test")]


def test_json_labels_with_label_key_and_class_names_from_a_file(tars: Path, tmp_path: Path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit {i}\n" for i in range(10)))
    out = tmp_path / "index"
    result = invoke(
        "shard-index", str(tars / "json" / TEST), "--label-key", "digit", "--class-names", str(names), "--out",
        str(out), "--workers", "1", "--no-sha256",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["label_key"] == "digit" and manifest["classes"][3] == "digit 3"
    expected = webdataset_samples([str(f) for f in sorted(tars.glob("test-*.tar"))])  # the .cls twins
    assert [label for _, label in loader_samples(out, "test")] == [label for _, label in expected]
    verified = invoke("shard-info", str(out), "--verify")
    assert verified.exit_code == 0 and "2 shards verified (size; the index has no sha256)" in verified.stdout


def test_http_and_pipe_shards_split_over_ranks_and_resume_like_local_ones(tars: Path, index: Path, server: str,
                                                                          tmp_path: Path):  # fmt: skip
    remote = tmp_path / "remote"
    pipe = f"pipe:cat {tars}/{TEST}"  # expanded into one command per shard
    result = invoke("shard-index", f"{server}/{TRAIN}", pipe, "--out", str(remote), "--workers", "2")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(remote)
    assert manifest["splits"]["test"]["shards"][1]["file"] == f"pipe:cat {tars}/test-000001.tar"
    assert [s["sha256"] for s in manifest["splits"]["train"]["shards"]] == [
        s["sha256"] for s in read_manifest(index)["splits"]["train"]["shards"]
    ]
    assert [x for _, x in loader_samples(remote, "test")] == [x for _, x in loader_samples(index, "test")]
    for rank in range(2):  # today's rank x worker split: equal steps, the same batches as from local files
        local, web = train_batches(index, rank), train_batches(remote, rank)
        assert len(web) == len(local) > 0 and all(torch.equal(a[0], b[0]) for a, b in zip(web, local, strict=True))
        resumed = train_batches(remote, rank, start_batch=3)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, web[3:], strict=True)) and resumed
    verified = invoke("shard-info", str(remote), "--verify")
    assert verified.exit_code == 0 and "8 shards verified (size and sha256)" in verified.stdout


def test_a_remote_shard_that_changed_is_refused_once_read(tars: Path, server: str, tmp_path: Path):
    (tars / "extra").mkdir(exist_ok=True)
    copy = tars / "extra" / "test-000000.tar"
    copy.write_bytes((tars / "test-000000.tar").read_bytes())
    index_shards([f"{server}/extra/test-000000.tar"], tmp_path, IndexOptions())
    with copy.open("ab") as f:
        f.write(bytes(10240))  # a readable tar with the same samples, longer
    size = copy.stat().st_size
    with pytest.raises(VmoeError) as error:
        loader_samples(tmp_path, "test")
    assert str(error.value) == (
        f"{server}/extra/test-000000.tar: {size} bytes, manifest.json says {size - 10240}; the shard changed: "
        "re-index with `vmoe shard-index`"
    )


def test_fsspec_urls(tars: Path, tmp_path: Path):
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://bucket/test-000000.tar", "wb") as f:
        f.write((tars / "test-000000.tar").read_bytes())
    index_shards(["memory://bucket/test-000000.tar"], tmp_path, IndexOptions())
    assert [x for _, x in loader_samples(tmp_path, "test")][:50] == [x for _, x in webdataset_samples(
        [str(tars / "test-000000.tar")])]  # fmt: skip


def test_fewshot_sweep_capacity_and_pretrain_read_an_index(index: Path, tmp_path: Path):
    train = {"steps": 2, "batch_size": 32, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "checkpoint_every": 2}
    settings = [f"data.shards={index}", "data.eval_split=test", *(f"train.{k}={v}" for k, v in train.items())]
    result = pretrain(load_recipe(ROOT / "recipes" / "digits-vmoe.yaml", settings), tmp_path / "run")
    assert result["eval_total"] == 100
    cache = str(tmp_path / "cache")
    fewshot = invoke("fewshot", "--checkpoint", str(tmp_path / "run"), str(index), "--shots", "1,5", "--seeds", "1",
                     "--cache-dir", cache)  # fmt: skip
    assert fewshot.exit_code == 0, fewshot.output
    assert "5-shot" in fewshot.stdout and index.name in fewshot.stdout
    sweep = invoke(
        "sweep-capacity", str(index), "--checkpoint", str(tmp_path / "run"), "--k", "1", "--capacity", "1",
        "--bpr", "on", "--repeats", "1", "--throughput-batch", "8", "--out", str(tmp_path / "sweep"), "--cache-dir",
        cache,
    )  # fmt: skip
    assert sweep.exit_code == 0, sweep.output
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"][0]["top1"] >= 0


def test_stock_tars_without_an_index_say_how_to_index_them(tars: Path):
    for data in (str(tars), str(tars / TEST), f"http://host/{TRAIN}"):
        result = invoke("fewshot", "--checkpoint", "pixels", data)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "vmoe shard-index" in result.stderr
    with pytest.raises(VmoeError, match=r"no manifest.json, but WebDataset tars: index them where they are with `vmoe"):
        build_loader(tars, "train", DataConfig(), batch_size=2, image_size=8, channels=1, train=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["NOPE/train-000000.tar"], "train-000000.tar: no such shard file"),
        (["json/" + TEST], "test-000000.tar: sample d00300 has no .cls label; every sample needs"),
        ([TEST, "--label-key", "digit"], "test-000000.tar: sample d00300 has no 'digit' in a .json member"),
        (["json/" + TEST, "--label-key", "nope"], "sample d00300 has no 'nope' in a .json member"),
        (["pipe:cat NOPE.tar", "--split", "test"], "the command exited with status 1: cat: "),
        (["json"], "json: its name says no split (train, val, validation, test, minival); give it with --split NAME"),
        (["not-a-tar-test.txt"], "not-a-tar-test.txt: unreadable tar ("),
        ([TEST, "--class-names", "a,b"], "--class-names: 2 names, but the shards have labels up to 9"),
        (["test-000000.tar", "test-000000.tar"], "test-000000.tar: given twice; name each shard once"),
        (["unknownscheme://x/test.tar"], "fsspec cannot read unknownscheme:// URLs"),
    ],
)
def test_bad_inputs_are_one_line(tars: Path, tmp_path: Path, monkeypatch, args: list[str], message: str):
    (tars / "not-a-tar-test.txt").write_text("hello")
    monkeypatch.chdir(tars)
    result = invoke("shard-index", *args, "--out", str(tmp_path / "index"), "--workers", "1")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_http_errors_and_missing_fsspec_are_one_line(server: str, tmp_path: Path, monkeypatch):
    urls = [f"{server}/train-000000.tar", f"{server}/train-000099.tar"]
    result = invoke("shard-index", *urls, "--out", str(tmp_path), "--workers", "2")  # raised in a pool worker
    assert result.exit_code == 2 and result.stderr.endswith("train-000099.tar: HTTP 404 File not found\n")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        result = invoke("shard-index", "s3://bucket/train-000000.tar", "--out", str(tmp_path))
        assert result.exit_code == 2 and "fsspec cannot read s3:// URLs (Install s3fs" in result.stderr
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if fsspec were not installed
    result = invoke("shard-index", "gs://bucket/train-000000.tar", "--out", str(tmp_path))
    assert result.exit_code == 2 and result.stderr == (
        "error: gs://bucket/train-000000.tar: reading gs:// URLs needs fsspec (pip install fsspec and its gs backend)\n"
    )


def test_only_an_index_signed_by_this_users_key_is_read(tars: Path, index: Path, tmp_path: Path, monkeypatch):
    """An index may name any file or `pipe:` command: a crafted, edited or foreign one is refused unread."""
    marker = tmp_path / "ran"
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["file"] = f"pipe:touch {marker}; cat {tars}/test-000000.tar"
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "manifest.json").write_text(json.dumps(manifest))  # the old signature no longer matches
    for unsigned in (manifest, {k: v for k, v in manifest.items() if k != "signature"}):
        (crafted / "manifest.json").write_text(json.dumps(unsigned))
        for attempt in (
            lambda: loader_samples(crafted, "test"),
            lambda: invoke("fewshot", "--checkpoint", "pixels", str(crafted)).stderr,
            lambda: invoke("shard-info", str(crafted), "--verify").stderr,
        ):
            try:
                said = attempt()
            except VmoeError as e:
                said = str(e)
            assert "an index not made by this user's `vmoe shard-index`" in said
    assert not marker.exists()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "another-user"))  # the same index, another key
    with pytest.raises(VmoeError, match="signature does not match"):
        read_manifest(index)


def test_split_names():
    assert split_of("/data/imagenet-train-000001.tar") == "train"
    assert split_of("https://host/test-runs/in1k-val-01.tar") == "val"
    assert split_of("pipe:aws s3 cp s3://b/minival/0001.tar -") == "minival"
    assert split_of("/data/shard-0001.tar") is None


def test_shard_info_divides_only_the_train_split_by_shard(index: Path):
    """Eval splits are divided by sample (data/loader.py: _eval_range), so their shard count never warns."""
    info = shard_info(index, ranks=2, workers=8)
    assert info["problems"] == ["train: 6 shards for 2 ranks x 8 workers: 10 readers get no shard (use fewer "
                                "workers, or reshard with a smaller --shard-size)"]  # fmt: skip
    assert shard_info(index, ranks=2, workers=8, train_split="test")["problems"][0].startswith("test: 2 shards")
    result = invoke("shard-info", str(index), "--ranks", "2", "--workers", "3")
    assert result.exit_code == 0 and result.stderr == "" and "8 shards present with the right sizes" in result.stdout


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the workers in /proc")
def test_kill_9_of_shard_index_leaves_no_worker(tars: Path, tmp_path: Path):
    """The scanning workers, each waiting on a slow `pipe:` shard, die with the main process."""
    slow = [f"pipe:touch {tmp_path}/started-{i}; sleep 60; cat {tars}/test-00000{i}.tar" for i in (0, 1)]
    args = ["shard-index", *slow, "--split", "test", "--out", str(tmp_path / "index"), "--workers", "2"]
    process = subprocess.Popen([sys.executable, "-c", "from vmoe_cli.cli import main; main()", *args])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(tmp_path.glob("started-*"))) == 2, "both workers scanning"
    workers = children(process.pid)
    assert len(workers) >= 2
    process.kill()
    process.wait()
    assert not any_running(workers), "a worker outlived the main process"


def test_an_interrupted_index_is_finished_scanning_only_what_it_lacks(tars: Path, index: Path, tmp_path: Path):
    """A run stopped by a failing shard keeps the records of those it scanned; the rerun scans only the rest and
    writes the same index as one uninterrupted run, then removes its records. A record edited by hand (or by
    anyone without the user's key) is not believed: that shard is scanned again."""
    counter = tmp_path / "scans"
    counted = f"pipe:echo >> {counter}; cat {tars}/test-000000.tar"
    out, options = tmp_path / "index", IndexOptions(split="test")
    with pytest.raises(VmoeError, match="exited with status 3"):
        index_shards([counted, "pipe:exit 3"], out, options)
    assert counter.read_text().count("\n") == 1 and not (out / "manifest.json").exists()
    said = []
    manifest = index_shards([counted, str(tars / "test-000001.tar")], out, options, say=said.append)
    assert said == ["resuming: 1 of 2 shards already indexed"] and counter.read_text().count("\n") == 1
    local = read_manifest(index)["splits"]["test"]
    assert manifest["splits"]["test"]["class_counts"] == local["class_counts"]
    assert [s["sha256"] for s in manifest["splits"]["test"]["shards"]] == [s["sha256"] for s in local["shards"]]
    assert not (out / ".vmoe-index").exists()

    with pytest.raises(VmoeError):
        index_shards([counted, "pipe:exit 3"], tmp_path / "again", options)
    (record,) = (tmp_path / "again" / ".vmoe-index").glob("*.json")
    kept = json.loads(record.read_text())
    kept["record"]["count"], kept["record"]["labels"] = 999, {"0": 999}
    record.write_text(json.dumps(kept))
    manifest = index_shards([counted], tmp_path / "again", options, say=said.append)
    assert manifest["splits"]["test"]["count"] == 50 and counter.read_text().count("\n") == 3
