"""Benchmark `vmoe sweep-capacity` against the naive loop a user would write, on the same grid.

Naive: for every grid point, reload the checkpoint, set the routing, run full forward passes over the split,
then time the forward pass as the sweep does. vmoe: one load, one pass over the split in which each batch's
embedding and dense blocks before the first MoE block run once and only the later blocks run per grid point,
the same timing per point. Both in this process, naive first, into a fresh temporary folder (no resume).
Accuracy per point must agree exactly; the script checks it.

Usage:  python scripts/bench_sweep.py --checkpoint runs/fmnist-vmoe shards/fmnist
            [--k 1,2] [--capacity 0.1,0.25,0.5,0.75,1,1.25,1.5,2] [--split test] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vmoe_cli.checkpoint import load_model, load_recipe_of, resolve_checkpoint
from vmoe_cli.config import DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.eval.sweep import SweepOptions, make_grid, sweep, time_forward


def naive(checkpoint: str, data: str, points: list, options: SweepOptions, cache: str) -> dict:
    """Reload + full evaluation + timing per grid point; top-1 per point name."""
    ckpt = resolve_checkpoint(checkpoint, "--checkpoint")
    shard_dir = eval_shards(data, cache)
    norm = load_recipe_of(ckpt).data or DataConfig()
    top1 = {}
    for p in points:
        model = load_model(ckpt)
        model.set_routing(k=p.k, capacity_factor=p.capacity_factor, capacity=None, bpr=p.bpr)
        cfg = model.cfg
        loader = build_loader(shard_dir, options.split, DataConfig(mean=norm.mean, std=norm.std),
                              batch_size=options.batch_size, image_size=cfg.image_size, channels=cfg.channels,
                              train=False)  # fmt: skip
        correct = total = 0
        first = None
        with torch.inference_mode():
            for x, y in loader:
                first = x[: options.throughput_batch] if first is None else first
                correct += int((model(x).logits.argmax(-1) == y).sum())
                total += len(y)
        time_forward(model, first, options)
        top1[p.name] = correct / total
    return top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--k", default="1,2")
    parser.add_argument("--capacity", default="0.1,0.25,0.5,0.75,1,1.25,1.5,2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    points = make_grid([int(k) for k in args.k.split(",")], [float(c) for c in args.capacity.split(",")], [True, False])
    options = SweepOptions(split=args.split, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        eval_shards(args.data, tmp)  # shard a raw source once, outside both timings
        start = time.perf_counter()
        slow = naive(args.checkpoint, args.data, points, options, tmp)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = sweep(args.checkpoint, args.data, points, f"{tmp}/sweep", options, cache_dir=tmp)
        sweep_s = time.perf_counter() - start
    same = all(fast_row["top1"] == slow[p.name] for p, fast_row in zip(points, fast["rows"], strict=True))
    print(
        f"{len(points)} grid points, split {args.split!r}, batch {args.batch_size}, threads {torch.get_num_threads()}"
    )
    print("| loop | wall s | per point s |\n|---|---:|---:|")
    print(f"| naive: reload + full forward per point | {naive_s:.1f} | {naive_s / len(points):.2f} |")
    print(f"| vmoe sweep-capacity | {sweep_s:.1f} | {sweep_s / len(points):.2f} |")
    print(f"speed-up {naive_s / sweep_s:.2f}x; top-1 identical at every point: {same}")


if __name__ == "__main__":
    main()
