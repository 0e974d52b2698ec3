"""Benchmark `vmoe shard --encoding keep` against a loop copying the same JPEG bytes with `webdataset.ShardWriter`.

Makes a synthetic ImageNet-like folder (photo-like JPEGs of 200-500 px per side, quality 90, in 100 class folders),
then, in this one process and alternating over rounds, measures images per CPU-second of:
  - the baseline: list the folder, then per image read its bytes and write `jpg`, `cls` and `json` (the same members
    vmoe writes) with `webdataset.ShardWriter`;
  - `write_shards(..., workers=1)` (in this process: listing, planning, reading, checking, tar, sha256, fsync) with
    `--validate` fast, full and none.
The best round of each is kept (the CPU time of the least disturbed run). Then a damaged copy of part of the
folder (truncations, bit flips, bursts of random bytes) is sharded with fast and with full: the counts of skipped
images must be equal.

Usage:  python scripts/bench_shard_keep.py [--images 2000] [--rounds 3] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source

CLASSES = 100


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random field plus noise: JPEG sizes like a photo's (a flat image compresses to nothing)."""
    field = rng.normal(size=(height // 16 + 2, width // 16 + 2, 3)).cumsum(0).cumsum(1)
    field = (field - field.min()) / (np.ptp(field) + 1e-9) * 220
    image = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC))
    return Image.fromarray(np.clip(image + rng.integers(-12, 12, image.shape), 0, 255).astype(np.uint8))


def make_folder(root: Path, images: int) -> int:
    """`images` JPEGs under root/cNNN/; returns their total bytes."""
    rng, total = np.random.default_rng(0), 0
    for i in range(images):
        path = root / f"c{i % CLASSES:03d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(rng, int(rng.integers(200, 501)), int(rng.integers(200, 501))).save(path, quality=90)
        total += path.stat().st_size
    return total


def copy_loop(root: Path, out: Path, shard_size: int) -> int:
    """The baseline: the same bytes and members through webdataset.ShardWriter, no check at all."""
    classes = sorted(p.name for p in root.iterdir())
    files = [(label, p) for label, name in enumerate(classes) for p in sorted((root / name).iterdir())]
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for n, (label, path) in enumerate(files):
            meta = {"id": path.relative_to(root).as_posix(), "label": label, "label_name": classes[label]}
            sink.write({"__key__": f"train_{n:08d}", "jpg": path.read_bytes(), "cls": str(label), "json": meta})
    return len(files)


def cpu_rate(run, root: Path, images: int) -> float:
    """Images per CPU-second of `run(out)` into a fresh folder."""
    out = Path(tempfile.mkdtemp(dir=root.parent))
    try:
        start = time.process_time()
        run(out)
        return images / (time.process_time() - start)
    finally:
        shutil.rmtree(out)


def damage(root: Path, dest: Path, count: int) -> None:
    """A copy of the first `count` images of `root`, about half of them damaged in one of three ways."""
    rnd = random.Random(0)
    for path in sorted(root.rglob("*.jpg"))[:count]:
        raw = bytearray(path.read_bytes())
        kind = rnd.randrange(6)
        if kind == 0:
            raw = raw[: rnd.randint(8, len(raw) - 1)]
        elif kind == 1:
            raw[rnd.randrange(8, len(raw))] ^= 1 << rnd.randrange(8)
        elif kind == 2:
            i = rnd.randrange(8, len(raw) - 8)
            raw[i : i + 8] = rnd.randbytes(8)
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the synthetic folder")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each case is kept")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        total = make_folder(root, args.images)
        print(f"{args.images} JPEGs, 200-500 px, mean {total / args.images / 1024:.1f} KiB; one process, one core")
        cases = {"webdataset.ShardWriter copy loop": lambda out: copy_loop(root, out, args.shard_size)}
        for mode in ("fast", "full", "none"):
            options = ShardOptions(validate=mode, shard_size=args.shard_size)
            cases[f"vmoe shard --validate {mode}"] = lambda out, o=options: write_shards(open_source(str(root)), out, o)
        best = {name: 0.0 for name in cases}
        for _ in range(args.rounds):
            for name, run in cases.items():
                best[name] = max(best[name], cpu_rate(run, root, args.images))
        base = best["webdataset.ShardWriter copy loop"]
        print(f"{'case':<40} {'images/CPU-s':>13} {'vs copy':>8}")
        for name, rate in best.items():
            print(f"{name:<40} {rate:>13,.0f} {rate / base:>7.2f}x")
        damaged = Path(tmp) / "damaged"
        damage(root, damaged, min(args.images, 1000))
        skipped = {}
        for mode in ("fast", "full"):
            out = Path(tmp) / f"damaged-{mode}"
            manifest = write_shards(open_source(str(damaged)), out, ShardOptions(validate=mode), max_skipped=1.0)
            skipped[mode] = [json.loads(line)["id"] for line in (out / "skipped.jsonl").open()]
        same = "the same images" if skipped["fast"] == skipped["full"] else "DIFFERENT images"
        print(f"damaged copy of {min(args.images, 1000)}: fast skipped {len(skipped['fast'])}, "
              f"full skipped {len(skipped['full'])} ({same}); {manifest['splits']['train']['count']} kept")  # fmt: skip


if __name__ == "__main__":
    main()
