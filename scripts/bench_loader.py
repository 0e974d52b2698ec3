"""Benchmark the vmoe training loader at 224 px against stock webdataset + Pillow doing the same work.

Makes a synthetic ImageNet-like folder (the photo-like JPEGs of `bench_shard_keep.py`: 200-500 px per side,
quality 90, 100 class folders), shards it with `write_shards` (`--encoding keep`: the JPEG bytes as they are),
then reads the train split once per reader and round, in this one process, alternating readers over rounds:
  - stock: `webdataset.WebDataset(urls).shuffle(1000)`, Pillow decode to RGB, an Inception-style random box
    (area 5-100%, aspect 3/4-4/3, as the V-MoE recipes) resized to 224 with `Image.resize(box=...)`, a random
    flip, to a normalised float tensor, batches of 128;
  - `build_loader(..., train=True, workers=0)` with the same crop and flip;
  - the same with RandAugment(2, 9) added (the stock reader has no counterpart; its ratio is against stock).
Each reader is timed in CPU-seconds of this process (`time.process_time`: robust to a busy machine), and the
median of the rounds is kept. The rate then says how many cores keep a GPU fed at `--feed` images/s.

Usage:  python scripts/bench_loader.py [--images 3000] [--rounds 3] [--feed 1000]
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from bench_shard_keep import make_folder  # scripts/ is on sys.path when this file is run
from PIL import Image

from vmoe_cli.data.config import AugmentConfig, DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source

SIZE, BATCH = 224, 128
SCALE, RATIO = (0.05, 1.0), (3 / 4, 4 / 3)  # the inception crop of the V-MoE recipes
CROP_FLIP = AugmentConfig(crop_scale=list(SCALE), crop_ratio=list(RATIO), flip=True)
RANDAUGMENT = AugmentConfig(
    crop_scale=list(SCALE), crop_ratio=list(RATIO), flip=True, randaugment_ops=2, randaugment_magnitude=9
)


def random_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A box of random area and aspect inside the image; the whole image when ten draws do not fit."""
    for _ in range(10):
        area = width * height * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return 0, 0, width, height


def stock_batches(urls: list[str], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stock webdataset + Pillow: decode, crop, flip, normalised tensors, full batches (the last partial one
    dropped, as the vmoe training loader does)."""
    rng, images_CHW, labels = random.Random(seed), [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).shuffle(1000, rng=random.Random(seed)):
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=random_box(*img.size, rng))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x_CHW = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        images_CHW.append((x_CHW.float() / 255 - 0.5) / 0.5)
        labels.append(int(sample["cls"]))
        if len(images_CHW) == BATCH:
            yield torch.stack(images_CHW), torch.tensor(labels)
            images_CHW, labels = [], []


def stock_epoch(urls: list[str], seed: int) -> int:
    """One pass of the stock reader. Returns images delivered."""
    return sum(len(x_BCHW) for x_BCHW, _ in stock_batches(urls, seed))


def vmoe_epoch(shards: Path, augment: AugmentConfig, seed: int) -> int:
    """One pass of the vmoe training loader (in this process) over the train split. Returns images delivered."""
    data = DataConfig(workers=0, augment=augment)
    loader = build_loader(shards, "train", data, batch_size=BATCH, image_size=SIZE, channels=3, train=True, seed=seed)
    return sum(len(x_BCHW) for x_BCHW, _ in loader)


def cpu_rate(epoch: Callable[[int], int], seed: int) -> float:
    """Images per CPU-second of this process for one call of `epoch(seed)`."""
    start = time.process_time()
    images = epoch(seed)
    return images / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="synthetic JPEGs to make and read per pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is kept")
    parser.add_argument("--shard-size", type=int, default=500, help="images per shard")
    parser.add_argument("--feed", type=int, default=1000, help="images/s a GPU trains at (ViT-B/16: about 1,000)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the work is per image in Pillow; no idle torch threads in the CPU time

    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp, "jpegs"), Path(tmp, "shards")
        mean_kib = make_folder(folder, args.images) / args.images / 1024
        write_shards(open_source(str(folder)), shards, ShardOptions(shard_size=args.shard_size))
        urls = sorted(str(p) for p in shards.glob("train-*.tar"))
        print(f"{args.images} JPEGs ({mean_kib:.1f} KiB on average) in {len(urls)} shards; {SIZE} px, batch {BATCH}")
        readers: dict[str, Callable[[int], int]] = {
            "stock `webdataset.WebDataset` + Pillow, crop + flip": lambda s: stock_epoch(urls, s),
            "vmoe `build_loader`, crop + flip": lambda s: vmoe_epoch(shards, CROP_FLIP, s),
            "vmoe `build_loader`, crop + flip + RandAugment(2, 9)": lambda s: vmoe_epoch(shards, RANDAUGMENT, s),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for r in range(args.rounds):
            for name, epoch in readers.items():
                rates[name].append(cpu_rate(epoch, seed=r))
            print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.0f}" for v in rates.values()), flush=True)

    stock = statistics.median(next(iter(rates.values())))
    print(f"\n| reader | images per CPU-second | vs stock | cores to feed {args.feed:,} images/s |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {rate / stock:.2f}x | {args.feed / rate:.1f} |")


if __name__ == "__main__":
    main()
