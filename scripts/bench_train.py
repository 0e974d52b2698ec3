"""Benchmark a V-MoE training step against its dense twin: time ratio vs analytic FLOP ratio.

A training step is forward, softmax cross-entropy (+ the routers' auxiliary losses), backward and an
AdamW update on random images and labels, batch `--batch`. The dense twin is the same recipe with
`model.moe=null` (same width, depth and patches; an MLP where the V-MoE has experts), or `--dense RECIPE`
with the same overrides and `model.moe=null`. Both run in this one process, interleaved: after `--warmup`
steps each, every round times a block of `--block` steps per model; the figures are medians over `--rounds`.

The FLOP ratio is the ratio of analytic forward FLOPs per image (vmoe_cli.eval.flops.flops_per_image, with
the images per routing group this batch gets); a training step costs about 3x the forward pass for either
model, so it is also the training FLOP ratio. Target: time ratio within 10% of it.
Like `vmoe`, the script first has glibc keep freed memory (vmoe_cli/allocator.py); `--glibc-malloc` does not.

Usage:  python scripts/bench_train.py [--recipe recipes/fmnist-vmoe.yaml] [--dense RECIPE] [--set KEY=VALUE ...]
            [--batch 128] [--device cpu|cuda] [--warmup 3] [--rounds 5] [--block 3] [--compile] [--glibc-malloc]
A ViT-S width case:  --recipe recipes/vmoe-vit-s16-every2.yaml --set model.depth=2 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vmoe_cli.allocator import keep_freed_memory
from vmoe_cli.config import load_recipe
from vmoe_cli.eval.flops import flops_per_image
from vmoe_cli.models.config import ModelConfig
from vmoe_cli.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]


def train_step_fn(cfg: ModelConfig, batch: int, device: str, compile_: bool = False) -> Callable[[], None]:
    """One training step of a fresh model of `cfg` on fixed random images, as a closure."""
    model = VisionTransformer(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
    forward = torch.compile(model, dynamic=False) if compile_ else model  # as train.compile
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step() -> None:
        out = forward(images)
        loss = F.cross_entropy(out.logits, labels) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def time_steps(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, block: int) -> dict[str, list[float]]:
    """Seconds per step of each case in every round, the cases interleaved within a round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(block):
                step()
            times[name].append((time.perf_counter() - start) / block)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "fmnist-vmoe.yaml"), help="the V-MoE")
    parser.add_argument("--dense", help="the dense model's recipe [default: --recipe with model.moe=null]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, both recipes")
    parser.add_argument("--batch", type=int, default=128, help="images per training step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models, as train.compile")
    parser.add_argument("--glibc-malloc", action="store_true", help="leave malloc as it is, unlike `vmoe`")
    args = parser.parse_args()
    kept = not args.glibc_malloc and keep_freed_memory()

    moe = load_recipe(args.recipe, args.overrides).model
    dense = load_recipe(args.dense or args.recipe, [*args.overrides, "model.moe=null"]).model
    if moe.moe is None:
        raise SystemExit(f"{args.recipe}: not a V-MoE (no model.moe section)")
    torch.manual_seed(0)
    names = {"V-MoE": moe, "dense": dense}
    steps = {name: train_step_fn(cfg, args.batch, args.device, args.compile) for name, cfg in names.items()}
    times = time_steps(steps, args.warmup, args.rounds, args.block)

    per_group = moe.moe.group_tokens(args.batch, moe.tokens_per_image) // moe.tokens_per_image
    flops = {"V-MoE": flops_per_image(moe, args.batch), "dense": flops_per_image(dense)}
    depth, width, hidden, _, patch = moe.sizes()
    print(
        f"{args.recipe}: {depth} blocks, width {width}, MLP {hidden}, MoE blocks {moe.moe_layers()}, "
        f"E={moe.moe.num_experts}, K={moe.moe.k}, cf={moe.moe.capacity_factor}, {moe.image_size} px / {patch}, "
        f"batch {args.batch} ({per_group} images per group), {args.device}, {torch.get_num_threads()} threads, "
        f"{'compiled' if args.compile else 'eager'}, "
        f"freed memory {'kept' if kept else 'returned to the OS'}"
    )
    print("| model | images/s | ms / step | forward GFLOPs / image |")
    print("|---|---:|---:|---:|")
    for name in names:
        seconds = statistics.median(times[name])
        print(f"| {name} | {args.batch / seconds:,.0f} | {seconds * 1e3:.1f} | {flops[name] / 1e9:.4f} |")
    time_ratio = statistics.median(m / d for m, d in zip(times["V-MoE"], times["dense"], strict=True))
    flop_ratio = flops["V-MoE"] / flops["dense"]
    print(f"time ratio V-MoE / dense (median over {args.rounds} rounds): {time_ratio:.3f}")
    print(f"FLOP ratio V-MoE / dense: {flop_ratio:.3f}")
    print(f"time ratio / FLOP ratio - 1: {100 * (time_ratio / flop_ratio - 1):+.1f}% (target: within +-10%)")


if __name__ == "__main__":
    main()
