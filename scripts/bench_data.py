"""Benchmark the data pipeline: sharding and loading throughput in images/second.

Sharding: the vmoe writer against a naive single-process loop over `webdataset.ShardWriter`
(Pillow PNG encode + write per image), same source, same shard size, in this one run.
Loading: the vmoe loader over the written shards with 0, 1 and 2 DataLoader workers, in
training mode (decode + random-resized crop + flip + RandAugment(2, 9), resampled) and in
evaluation mode (decode + resize), against a stock `webdataset.WebDataset(...).decode()` loop; then
training again with `cache=True` (the split decoded once into memory, timed apart, then read from there).
Throughput counts decoded, augmented images delivered to the caller, worker start-up included.
Whether loading outpaces training is judged against the training step rate of the tiny
Fashion-MNIST V-MoE recipe (forward + backward + AdamW step, batch 128, all threads), measured last.

Usage:  python scripts/bench_data.py [--source PATH|digits] [--images 20000] [--shard-size 2000]
The source defaults to Fashion-MNIST (70,000 images) when the Debian package is installed at
/usr/share/datasets/fashion-mnist, to scikit-learn's digits (1,797 images) otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from vmoe_cli.data.config import AugmentConfig, DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.manifest import FORMAT, MANIFEST, read_manifest
from vmoe_cli.data.plan import build_plan
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import ArrayItem, FileItem, Item, Source, open_source

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN_AUGMENT = AugmentConfig(crop_scale=[0.35, 1.0], flip=True, randaugment_ops=2, randaugment_magnitude=9)


def listed(source: Source) -> tuple[list[str], dict[str, list[Item]]]:
    """The classes and every item of each listed split (read from a plan, in its seeded order)."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = build_plan(source, ShardOptions(), Path(tmp) / "plan")
        return plan.classes, {split: plan.items(split, 0, bounds[-1]) for split, bounds in plan.bounds.items()}


def naive_shard(classes: list[str], splits: dict[str, list[Item]], out: Path, shard_size: int) -> int:
    """The baseline: one process, one `ShardWriter` per split, PNG-encode and write each image in turn.

    Writes a vmoe-shards/1 manifest too (no checksums), so the loader can read the result. Returns images written.
    """
    manifest = {"format": FORMAT, "classes": classes, "splits": {}}
    for split, items in splits.items():
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for n, item in enumerate(items):
                sink.write({"__key__": f"{split}_{n:08d}", "png": _png(item), "cls": str(item.label)})
        counts = [min(shard_size, len(items) - start) for start in range(0, len(items), shard_size)]
        files = [f"{split}-{i:06d}.tar" for i in range(len(counts))]
        shards = [
            {"file": f, "count": c, "bytes": (out / f).stat().st_size} for f, c in zip(files, counts, strict=True)
        ]
        manifest["splits"][split] = {"count": len(items), "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return sum(len(items) for items in splits.values())


def _png(item: ArrayItem | FileItem) -> bytes:
    if isinstance(item, FileItem):
        return item.path.read_bytes()  # already encoded; a real writer would validate it
    buffer = io.BytesIO()
    Image.fromarray(item.pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def vmoe_shard(source: Source, out: Path, shard_size: int, workers: int) -> int:
    """The vmoe writer (parallel, validated, checksummed, PNG bytes as the naive loop). Returns images written."""
    manifest = write_shards(source, out, ShardOptions(shard_size=shard_size), workers=workers)
    return sum(split["count"] for split in manifest["splits"].values())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_rate(
    shards: Path, split: str, train: bool, workers: int, images: int, channels: int, size: int, cache: bool = False
) -> float:
    """Images/s of the vmoe loader over up to `images` images of `split`."""
    count = read_manifest(shards)["splits"][split]["count"]
    batch = 128
    data = DataConfig(
        workers=workers,
        cache=cache,
        resampled=train,
        epoch_images=min(images, count) if train else None,
        augment=TRAIN_AUGMENT if train else AugmentConfig(),
    )
    loader = build_loader(shards, split, data, batch_size=batch, image_size=size, channels=channels, train=train)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def stock_rate(shards: Path, split: str, images: int) -> float:
    """Images/s of stock webdataset: read, decode to uint8 arrays, to tensors, one process."""
    urls = sorted(str(p) for p in shards.glob(f"{split}-*.tar"))
    start, seen = time.perf_counter(), 0
    for image, _ in wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("png", "cls"):
        torch.tensor(image)
        seen += 1
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def train_rate(recipe: str, batch: int = 128, steps: int = 5) -> float:
    """Images/s of training steps (forward, backward, AdamW) of `recipe`'s model on random images."""
    from vmoe_cli.config import load_recipe
    from vmoe_cli.models.vit import VisionTransformer

    cfg = load_recipe(recipe).model
    model = VisionTransformer(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    labels = torch.randint(0, cfg.num_classes, (batch,))

    def step() -> None:
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    seconds, _ = timed(lambda: [step() for _ in range(steps)])
    return steps * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = str(FASHION_MNIST) if FASHION_MNIST.is_dir() else "digits"
    parser.add_argument("--source", default=default, help=f"image source for `vmoe shard` (default: {default})")
    parser.add_argument("--images", type=int, default=20000, help="images read per loader measurement")
    parser.add_argument("--shard-size", type=int, default=2000, help="images per shard")
    parser.add_argument("--shard-workers", type=int, default=2, help="processes of the vmoe writer")
    parser.add_argument("--size", type=int, default=28, help="image side the loader delivers")
    parser.add_argument("--recipe", default="recipes/fmnist-vmoe.yaml", help="recipe whose training rate to compare")
    args = parser.parse_args()

    source = open_source(args.source)
    classes, splits = listed(source)
    total = sum(len(items) for items in splits.values())
    print(f"source: {source.spec} ({total} images, splits {', '.join(splits)}); torch threads 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        naive_dir, vmoe_dir = Path(tmp, "naive"), Path(tmp, "vmoe")
        naive_dir.mkdir(), vmoe_dir.mkdir()
        naive_s, _ = timed(lambda: naive_shard(classes, splits, naive_dir, args.shard_size))
        vmoe_s, written = timed(lambda: vmoe_shard(source, vmoe_dir, args.shard_size, args.shard_workers))
        print(f"\n{'sharding':<50} {'images/s':>10} {'vs naive':>9}")
        print(f"{'naive webdataset.ShardWriter loop':<50} {total / naive_s:>10.0f} {1.0:>8.2f}x")
        name = f"vmoe shard, {args.shard_workers} workers"
        print(f"{name:<50} {written / vmoe_s:>10.0f} {naive_s / vmoe_s * written / total:>8.2f}x")

        eval_split = "test" if "test" in splits else "train"
        stock = stock_rate(vmoe_dir, eval_split, args.images)
        title = f"loading (up to {args.images} images, batch 128)"
        print(f"\n{title:<50} {'images/s':>10} {'vs stock':>9}")
        print(f"{'stock webdataset decode loop, 1 process':<50} {stock:>10.0f} {1.0:>8.2f}x")
        for train, split in ((False, eval_split), (True, "train")):
            for workers in (0, 1, 2):
                rate = load_rate(vmoe_dir, split, train, workers, args.images, 1, args.size)
                name = f"vmoe {'train (crop, flip, RandAugment 2/9)' if train else 'eval (resize)'}, {workers} workers"
                print(f"{name:<50} {rate:>10.0f} {rate / stock:>8.2f}x")
        fill, _ = timed(lambda: load_rate(vmoe_dir, "train", True, 0, 128, 1, args.size, cache=True))
        print(f"{'decode the train split into the cache (once)':<50} {fill:>9.1f}s")
        for workers in (0, 1, 2):
            rate = load_rate(vmoe_dir, "train", True, workers, args.images, 1, args.size, cache=True)
            print(f"{f'vmoe train, cached, {workers} workers':<50} {rate:>10.0f} {rate / stock:>8.2f}x")
    torch.set_num_threads(threads)
    rate = train_rate(args.recipe)
    print(f"\n{'training step of ' + args.recipe + ', batch 128':<50} {rate:>10.0f} images/s")


if __name__ == "__main__":
    main()
