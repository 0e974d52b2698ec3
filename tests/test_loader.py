"""The shard loader: who reads what across ranks and workers, equal steps, resume, exact pixels, augmentation."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from vmoe_cli.cli import main
from vmoe_cli.data.augment import OPS, augment_image, eval_view, mixup
from vmoe_cli.data.config import AugmentConfig, DataConfig
from vmoe_cli.data.loader import DECODED, build_loader, decode_image
from vmoe_cli.data.manifest import read_manifest
from vmoe_cli.errors import VmoeError

SIZE = 8


def write_shards(root: Path, counts: dict[str, list[int]], channels: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Shards in the vmoe-shards/1 format with random PNG images; label of sample n = n (so labels name samples).

    `counts[split]` lists the samples per shard. Returns the pixels of each split, [N, H, W] or [N, H, W, 3].
    """
    rng = np.random.default_rng(seed)
    total = max(sum(c) for c in counts.values())
    manifest = {"format": "vmoe-shards/1", "classes": [f"c{i}" for i in range(total)], "splits": {}}
    pixels = {}
    for split, shard_counts in counts.items():
        shape = (sum(shard_counts), SIZE, SIZE) + ((3,) if channels == 3 else ())
        pixels[split] = rng.integers(0, 256, shape, dtype=np.uint8)
        shards, n = [], 0
        for index, count in enumerate(shard_counts):
            file = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / file)) as sink:
                for _ in range(count):
                    png = io.BytesIO()
                    Image.fromarray(pixels[split][n]).save(png, format="PNG")
                    meta = {"id": f"img{n}", "label": n, "label_name": f"c{n}"}
                    sink.write({"__key__": f"{split}_{n:08d}", "png": png.getvalue(), "cls": str(n), "json": meta})
                    n += 1
            data = (root / file).read_bytes()
            shards.append(
                {"file": file, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        manifest["splits"][split] = {"count": n, "class_counts": {}, "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return pixels


def labels_of(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_eval_two_ranks_two_workers_read_every_sample_once(tmp_path):
    write_shards(tmp_path, {"test": [7, 5, 9]})
    seen = []
    for rank in range(2):
        loader = build_loader(
            tmp_path, "test", DataConfig(workers=2), batch_size=2, image_size=SIZE, channels=1, train=False, rank=rank,
            world_size=2,
        )  # fmt: skip
        batches = labels_of(loader)
        assert len(batches) == loader.steps
        seen += [label for batch in batches for label in batch]
    assert seen == list(range(21))  # disjoint, the union is the whole split, in manifest order


def test_train_two_ranks_two_workers_equal_steps_disjoint_samples(tmp_path):
    write_shards(tmp_path, {"train": [6, 5, 9, 4, 7]})
    steps, seen = [], []
    for rank in range(2):
        loader = build_loader(
            tmp_path, "train", DataConfig(workers=2), batch_size=2, image_size=SIZE, channels=1, train=True, rank=rank,
            world_size=2,
        )  # fmt: skip
        batches = labels_of(loader)
        assert len(batches) == loader.steps and all(len(b) == 2 for b in batches)
        steps.append(loader.steps)
        seen += [label for batch in batches for label in batch]
    assert steps[0] == steps[1] > 0
    assert len(seen) == len(set(seen))


def test_train_shard_order_depends_on_epoch_and_seed(tmp_path):
    write_shards(tmp_path, {"train": [4] * 6})

    def first_labels(seed: int, epoch: int) -> list[list[int]]:
        options = {"batch_size": 4, "image_size": SIZE, "channels": 1, "train": True, "seed": seed, "epoch": epoch}
        return labels_of(build_loader(tmp_path, "train", DataConfig(), **options))

    assert first_labels(0, 0) == first_labels(0, 0)
    assert first_labels(0, 0) != first_labels(0, 1)
    assert sorted(sum(first_labels(1, 0), [])) == list(range(24))


def test_resampled_yields_exactly_steps(tmp_path):
    write_shards(tmp_path, {"train": [5, 5]})
    loader = build_loader(
        tmp_path,
        "train",
        DataConfig(workers=2, resampled=True, epoch_images=40),
        batch_size=3,
        image_size=SIZE,
        channels=1,
        train=True,
        world_size=2,
    )
    assert loader.steps == 40 // (3 * 2)
    assert len(labels_of(loader)) == loader.steps


def test_resume_replays_the_same_batches(tmp_path):
    write_shards(tmp_path, {"train": [9, 7, 8, 6]}, channels=3)
    augment = AugmentConfig(crop_scale=[0.3, 1.0], flip=True, randaugment_ops=2, randaugment_magnitude=9)

    def batches(start_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_loader(
            tmp_path,
            "train",
            DataConfig(workers=2, augment=augment),
            batch_size=2,
            image_size=6,
            channels=3,
            train=True,
            seed=3,
            epoch=1,
            start_batch=start_batch,
        )
        return list(loader)

    full, resumed = batches(0), batches(3)
    assert len(full) == 14 and len(resumed) == len(full) - 3
    for (x, y), (rx, ry) in zip(full[3:], resumed, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_one_worker_process_gives_the_batches_of_none(tmp_path):
    """workers=1 reads in a DataLoader process, workers=0 in this one: one stream, the same batches."""
    write_shards(tmp_path, {"train": [9, 7]})
    augment = AugmentConfig(crop_scale=[0.3, 1.0], flip=True)
    options = {"batch_size": 2, "image_size": 6, "channels": 1, "train": True, "seed": 1}
    runs = [list(build_loader(tmp_path, "train", DataConfig(workers=w, augment=augment), **options)) for w in (0, 1)]
    assert len(runs[0]) == len(runs[1]) == 8
    for (x, y), (x1, y1) in zip(*runs, strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_gives_the_same_batches_and_reads_each_shard_once(tmp_path, workers):
    """`cache=True`: the batches of an uncached loader, train (augmented, resumed) and eval; tars read once."""
    write_shards(tmp_path, {"train": [9, 7, 8, 6], "test": [5, 6]}, channels=3)
    augment = AugmentConfig(crop_scale=[0.3, 1.0], flip=True, randaugment_ops=2, randaugment_magnitude=9)

    def batches(split: str, cache: bool, epoch: int = 1, start_batch: int = 0) -> list[tuple[torch.Tensor, ...]]:
        train = split == "train"
        return list(
            build_loader(
                tmp_path, split, DataConfig(workers=workers, cache=cache, augment=augment), batch_size=2,
                image_size=6, channels=3, train=train, seed=3, epoch=epoch, start_batch=start_batch,
            )
        )  # fmt: skip

    DECODED.clear()
    for split, epoch, start in (("train", 1, 0), ("train", 2, 3), ("test", 0, 0)):
        plain, cached = batches(split, False, epoch, start), batches(split, True, epoch, start)
        assert len(plain) == len(cached) > 0
        for (x, y), (cx, cy) in zip(plain, cached, strict=True):
            assert torch.equal(x, cx) and torch.equal(y, cy)
    assert len(DECODED) == 6  # 4 train + 2 test shards, decoded once each


def test_cache_fill_reports_progress_once(tmp_path):
    """The cache fill tells `progress` the images decoded, shard by shard; a split already in memory says nothing."""
    write_shards(tmp_path, {"train": [9, 7], "test": [5]})
    calls = []

    def progress(what, done, total, unit="images"):
        calls.append((what, done, total, unit))

    DECODED.clear()
    for split in ("train", "train", "test"):
        build_loader(tmp_path, split, DataConfig(cache=True), batch_size=2, image_size=SIZE, channels=1,
                     train=split == "train", progress=progress)  # fmt: skip
    train, test = "decode train (data.cache)", "decode test (data.cache)"
    assert calls == [(train, 0, 16, "images"), (train, 9, 16, "images"), (train, 16, 16, "images"),
                     (test, 0, 5, "images"), (test, 5, 5, "images")]  # fmt: skip


def test_cache_rereads_a_rewritten_shard(tmp_path):
    """A shard re-written in place (new size or mtime) is decoded again, never served stale."""
    first = write_shards(tmp_path, {"test": [4]}, seed=0)["test"]

    def pixels() -> torch.Tensor:
        loader = build_loader(tmp_path, "test", DataConfig(cache=True), batch_size=4, image_size=SIZE, channels=1,
                              train=False, raw=True)  # fmt: skip
        return torch.cat([x for x, _ in loader])[:, 0]

    assert torch.equal(pixels(), torch.from_numpy(first))
    second = write_shards(tmp_path, {"test": [4]}, seed=1)["test"]
    assert torch.equal(pixels(), torch.from_numpy(second))


def test_round_trip_pixels_and_labels_exact(tmp_path):
    pixels = write_shards(tmp_path, {"test": [5, 6]}, channels=3)["test"]
    loader = build_loader(
        tmp_path, "test", DataConfig(), batch_size=4, image_size=SIZE, channels=3, train=False, raw=True
    )
    images, labels = zip(*loader, strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.dtype == torch.uint8 and images.shape == (11, 3, SIZE, SIZE)
    assert torch.equal(labels, torch.arange(11))
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(pixels))


def test_eval_view_squashes_by_default_and_centre_crops_with_crop_pct():
    """A 64 x 40 photo-like image at 32 px: squashed whole, or (crop_pct 0.875) its shorter side resized to
    floor(32 / 0.875) = 36, the longer to int(36 * 64 / 40) = 57, and the centre 32 x 32 cut at (12, 2)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64)[None, :, None] + np.linspace(0, 80, 40)[:, None, None]
    img = Image.fromarray(np.clip(ramp + rng.normal(0, 20, (40, 64, 3)), 0, 255).astype(np.uint8))
    bilinear = Image.Resampling.BILINEAR
    squashed = img.resize((32, 32), bilinear)
    cropped = img.resize((57, 36), bilinear).crop((12, 2, 44, 34))  # (57 - 32) / 2 = 12.5 rounds to even
    assert np.array_equal(np.asarray(eval_view(img, 32, None)), np.asarray(squashed))
    assert np.array_equal(np.asarray(eval_view(img, 32, 0.875)), np.asarray(cropped))
    tall = img.transpose(Image.Transpose.ROTATE_90)  # 40 x 64: the same cut, turned
    cropped = tall.resize((36, 57), bilinear).crop((2, 12, 34, 44))
    assert np.array_equal(np.asarray(eval_view(tall, 32, 0.875)), np.asarray(cropped))
    assert np.array_equal(np.asarray(eval_view(squashed, 32, 1.0)), np.asarray(squashed))  # a square at size: as is


def test_eval_crop_pct_reaches_evaluation_batches_only(tmp_path):
    """data.eval_crop_pct: evaluation batches centre-cropped as eval_view says; training unchanged; out of range
    is a one-line error naming the key."""
    pixels = write_shards(tmp_path, {"train": [4], "test": [5]})
    options = {"batch_size": 5, "image_size": SIZE, "channels": 1, "raw": True}
    [(images, _)] = build_loader(tmp_path, "test", DataConfig(eval_crop_pct=0.5), train=False, **options)
    expected = [np.asarray(eval_view(Image.fromarray(p), SIZE, 0.5)) for p in pixels["test"]]
    assert torch.equal(images[:, 0], torch.from_numpy(np.stack(expected)))
    assert not torch.equal(images[:, 0], torch.from_numpy(pixels["test"]))
    train = {"batch_size": 4, "image_size": SIZE, "channels": 1, "raw": True, "train": True}
    [(plain, _)] = build_loader(tmp_path, "train", DataConfig(), **train)
    [(same, _)] = build_loader(tmp_path, "train", DataConfig(eval_crop_pct=0.5), **train)
    assert torch.equal(plain, same)
    with pytest.raises(VmoeError, match=r"data.eval_crop_pct must be in \(0, 1\]"):
        build_loader(tmp_path, "test", DataConfig(eval_crop_pct=1.5), train=False, **options)


def test_normalised_batches(tmp_path):
    write_shards(tmp_path, {"test": [3]})
    ((images, labels),) = build_loader(
        tmp_path, "test", DataConfig(), batch_size=4, image_size=4, channels=1, train=False
    )
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_stock_webdataset_reads_our_shards(tmp_path):
    pixels = write_shards(tmp_path, {"train": [4, 3]})["train"]
    urls = [str(tmp_path / s["file"]) for s in read_manifest(tmp_path)["splits"]["train"]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls", "json")
    samples = list(dataset)
    assert [key for key, *_ in samples] == [f"train_{n:08d}" for n in range(7)]
    for n, (_, image, label, meta) in enumerate(samples):
        assert np.array_equal(image, pixels[n]) and label == n and meta["label"] == n


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> tuple[Path, list]:
    """scikit-learn's digits through the vmoe shard writer; also returns the items in their shard order."""
    shard = pytest.importorskip("vmoe_cli.data.shard")
    from vmoe_cli.data.plan import build_plan
    from vmoe_cli.data.sources import open_source

    source, options = open_source("digits"), shard.ShardOptions(shard_size=500)
    out = tmp_path_factory.mktemp("digits")
    shard.write_shards(source, out, options)
    plan = build_plan(source, options, tmp_path_factory.mktemp("plan") / "plan")
    return out, plan.items("train", 0, plan.bounds["train"][-1])


def test_digits_round_trip_through_the_writer(digits_shards):
    out, items = digits_shards
    loader = build_loader(
        out, "train", DataConfig(workers=2), batch_size=256, image_size=8, channels=1, train=False, raw=True
    )
    images, labels = (torch.cat(t) for t in zip(*loader, strict=True))
    assert torch.equal(images[:, 0], torch.from_numpy(np.stack([item.pixels for item in items])))
    assert labels.tolist() == [item.label for item in items]


def test_stock_webdataset_reads_the_writers_shards(digits_shards):
    out, items = digits_shards
    urls = [str(out / s["file"]) for s in read_manifest(out)["splits"]["train"]["shards"]]
    samples = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls", "json")
    for n, (key, image, label, meta) in enumerate(samples):
        assert key == f"train_{n:08d}" and np.array_equal(image, items[n].pixels)
        assert label == meta["label"] == items[n].label and meta["id"] == items[n].id
    assert n == len(items) - 1


def test_decode_image_grey_and_rgb():
    png = io.BytesIO()
    Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8)).save(png, format="PNG")
    assert decode_image(png.getvalue(), 3).shape == (3, 3, 5)
    assert decode_image(png.getvalue(), 1).shape == (1, 3, 5)


def test_bad_shard_dir_and_settings(tmp_path):
    with pytest.raises(VmoeError, match="not a vmoe shard directory"):
        build_loader(tmp_path, "train", DataConfig(), batch_size=2, image_size=SIZE, channels=1, train=True)
    write_shards(tmp_path, {"train": [4, 4]})
    with pytest.raises(VmoeError, match="no split 'test'"):
        build_loader(tmp_path, "test", DataConfig(), batch_size=2, image_size=SIZE, channels=1, train=False)
    with pytest.raises(VmoeError, match="resampled"):
        build_loader(tmp_path, "train", DataConfig(workers=2), batch_size=2, image_size=SIZE, channels=1, train=True,
                     world_size=2)  # fmt: skip
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar")
    with pytest.raises(VmoeError, match="train-000001.tar"):
        list(build_loader(tmp_path, "train", DataConfig(), batch_size=2, image_size=SIZE, channels=1, train=False))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_randaugment_op_keeps_size_and_mode(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode)
    for name, op in OPS.items():
        out = op(img, 10, random.Random(0))
        assert out.size == img.size and out.mode == mode, name
    out = augment_image(img, 7, AugmentConfig(crop_scale=[0.1, 0.5], flip=True, randaugment_ops=3), random.Random(1))
    assert out.size == (7, 7)


def test_mixup_mixes_images_and_targets_alike():
    images = torch.arange(4.0).view(4, 1, 1, 1)
    targets = torch.eye(4)
    mixed, soft = mixup(images, targets, 0.2, torch.Generator().manual_seed(0))
    lam = soft[0, 0]
    assert torch.allclose(soft.sum(1), torch.ones(4))
    assert torch.allclose(mixed.flatten(), lam * images.flatten() + (1 - lam) * images.flip(0).flatten())
    again, _ = mixup(images, targets, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)


def test_manifest_shard_files_must_lie_inside_the_shard_folder(tmp_path):
    """Absolute paths, `..` and symlinks leading out are refused by the manifest's reader, so by every command."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, {"train": [2, 2]})
    manifest = json.loads((shards / "manifest.json").read_text())
    outside = tmp_path / "outside.tar"
    outside.write_bytes((shards / "train-000001.tar").read_bytes())
    (shards / "escape.tar").symlink_to(outside)
    (shards / "alias.tar").symlink_to("train-000001.tar")

    def with_file(file: object) -> dict:
        manifest["splits"]["train"]["shards"][1]["file"] = file
        (shards / "manifest.json").write_text(json.dumps(manifest))
        return read_manifest(shards)

    for file in (str(outside), "../outside.tar", "escape.tar", "sub/../train-000001.tar"):
        with pytest.raises(VmoeError) as error:
            with_file(file)
        assert str(error.value) == (
            f"{shards / 'manifest.json'}: split 'train': shard file {file!r} is outside the shard folder (an absolute "
            "path, '..' or a symlink leading out); shard files must lie in the folder"
        )
        result = CliRunner().invoke(main, ["shard-info", str(shards)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and repr(file) in result.stderr
    with pytest.raises(VmoeError, match="shard entry {'file': 3, .*needs a file name and whole-number count and bytes"):
        with_file(3)
    with_file("alias.tar")  # a symlink that stays inside is fine
    loader = build_loader(shards, "train", DataConfig(), batch_size=4, image_size=SIZE, channels=1, train=False)
    assert labels_of(loader) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("cache", [False, True])
def test_a_shard_whose_size_differs_from_the_manifest_is_refused_when_opened(tmp_path, cache):
    """Trailing bytes keep a tar readable with the right count: only the size check notices the changed file."""
    write_shards(tmp_path, {"test": [2, 2]})
    shard = tmp_path / "test-000001.tar"
    size = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(bytes(512))
    options = {"batch_size": 1, "image_size": SIZE, "channels": 1, "train": False}
    with pytest.raises(VmoeError) as error:
        list(build_loader(tmp_path, "test", DataConfig(cache=cache), **options))  # a cache reads every shard at once
    assert str(error.value) == (
        f"{shard}: {size + 512} bytes, manifest.json says {size}; the shard changed: re-run `vmoe shard`"
    )
