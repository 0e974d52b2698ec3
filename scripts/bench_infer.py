"""Benchmark inference: dropless vs capacity execution, per-image routing and Soft MoE against the dense twin.

For each size, every model runs the forward pass (evaluation mode, no gradients) on the same random images at
each batch size: latency at batch 1, throughput at larger batches. The figures are time ratios against the
dense twin next to the analytic FLOP ratios (vmoe_cli.eval.flops, with the routing groups that batch gets).
All models run in this one process, interleaved: after `--warmup` passes each, every round times one pass
per model (a fast pass repeated to last about 0.1 s); a ratio is the median over rounds of the round's time
over the dense twin's time in that round. Batches above 16 images get proportionally fewer rounds, at least 3
(`--rounds 5`: 3 at batch 64), so that the default run takes a few minutes on 2 CPU cores.

Sizes (the models are the recipes' model sections, weights random):
  s16     ViT-S/16 width (D=384, H=1536, 12 blocks, 197 tokens): recipes/vit-s16.yaml; V-MoE and per-image
          from recipes/mobile-vmoe-s16.yaml (MoE in the last two odd blocks) with E=8, V-MoE cf 1.05; Soft MoE
          from recipes/soft-moe-s16.yaml in the same two blocks with E=8 and cf 1 (24 slots per expert).
  fmnist  the Fashion-MNIST recipes: fmnist-vit, fmnist-vmoe (E=8, cf 1.25), fmnist-per-image, fmnist-soft.
V-MoE K=1 and K=2 are one model whose routing is switched between passes (capacity or dropless); per-image
routing runs dropless, its default at inference. Target: dropless V-MoE K=1 and per-image at batch 1 within 5%
of their FLOP ratio at s16.

Usage:  python scripts/bench_infer.py [--sizes s16,fmnist] [--batches 1,16,64] [--warmup 1] [--rounds 5]
            [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vmoe_cli.allocator import keep_freed_memory
from vmoe_cli.config import load_recipe
from vmoe_cli.eval.flops import flops_per_image
from vmoe_cli.models.config import ModelConfig
from vmoe_cli.models.vit import VisionTransformer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SAMPLE_S = 0.1  # a timed sample lasts at least about this long (fast passes are repeated)
S16_MOE = ["model.moe.num_experts=8", "model.moe.layers=last-2"]
SIZES = {  # name -> (dense, V-MoE, per-image, Soft MoE): recipe and overrides
    "s16": (
        ("vit-s16.yaml", []),
        ("mobile-vmoe-s16.yaml", [*S16_MOE, "model.moe.router=token_choice", "model.moe.capacity_factor=1.05"]),
        ("mobile-vmoe-s16.yaml", S16_MOE),
        ("soft-moe-s16.yaml", [*S16_MOE, "model.moe.capacity=null", "model.moe.capacity_factor=1.0"]),
    ),
    "fmnist": (
        ("fmnist-vit.yaml", []),
        ("fmnist-vmoe.yaml", []),
        ("fmnist-per-image.yaml", ["model.moe.superclasses=null"]),  # guidance is a training loss
        ("fmnist-soft.yaml", []),
    ),
}


@dataclass
class Case:
    """One row of the table: a model and the routing it runs with (None: as built)."""

    name: str
    model: VisionTransformer
    routing: dict[str, object] | None = None

    def prepare(self) -> VisionTransformer:
        if self.routing is not None:
            self.model.set_routing(**self.routing)
        return self.model


def build(recipe: str, overrides: list[str], device: str) -> VisionTransformer:
    cfg: ModelConfig = load_recipe(RECIPES / recipe, overrides).model
    return VisionTransformer(cfg).to(device).eval()


def cases(size: str, device: str) -> list[Case]:
    """The models of `size`: dense twin, V-MoE K=1 and K=2 in capacity and dropless mode, per-image, Soft MoE."""
    torch.manual_seed(0)
    dense, vmoe, per_image, soft = (build(recipe, overrides, device) for recipe, overrides in SIZES[size])
    cf = vmoe.cfg.moe.capacity_factor
    rows = [Case("dense twin", dense)]
    for k in (1, 2):
        rows.append(Case(f"V-MoE K={k} capacity (cf {cf:g})", vmoe, {"k": k, "capacity_factor": cf}))
        rows.append(Case(f"V-MoE K={k} dropless", vmoe, {"k": k, "dropless": True}))
    rows.append(Case(f"per-image K={per_image.cfg.moe.k} (dropless)", per_image))
    rows.append(Case("Soft MoE", soft))
    return rows


def timed(run: Callable[[], object], passes: int, device: str) -> float:
    """Seconds per pass over `passes` consecutive passes."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(passes):
        run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / passes


@torch.inference_mode()
def measure(rows: list[Case], batch: int, warmup: int, rounds: int, device: str) -> dict[str, dict[str, float]]:
    """Per case: median seconds per pass, median time ratio to the dense twin (the first case), FLOP ratio.

    A timed sample repeats a pass that is faster than SAMPLE_S (the dense twin's last warm-up pass) until it
    lasts about that long, the same number of passes for every case, so that a sample is not one scheduler tick.
    """
    cfg = rows[0].model.cfg
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    flops, passes = {}, 1
    for row in rows:
        model = row.prepare()
        flops[row.name] = flops_per_image(model.cfg, batch)
        for _ in range(warmup):
            seconds = timed(lambda model=model: model(images), 1, device)
            passes = max(1, round(SAMPLE_S / seconds)) if row is rows[0] else passes
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            model = row.prepare()
            times[row.name].append(timed(lambda model=model: model(images), passes, device))
    dense = rows[0].name
    return {
        row.name: {
            "seconds": statistics.median(times[row.name]),
            "time_ratio": statistics.median(t / d for t, d in zip(times[row.name], times[dense], strict=True)),
            "flop_ratio": flops[row.name] / flops[dense],
        }
        for row in rows
    }


def table(size: str, rows: list[Case], results: dict[int, dict[str, dict[str, float]]]) -> str:
    """A markdown table: per batch size, ms (batch 1) or images/s, time ratio and FLOP ratio to the dense twin."""
    head, rule = ["model"], ["---"]
    for batch in results:
        head += [f"batch {batch}: " + ("ms" if batch == 1 else "images/s"), "time / dense", "FLOPs / dense"]
        rule += ["---:"] * 3
    lines = [f"| {' | '.join(head)} |", f"|{'|'.join(rule)}|"]
    for row in rows:
        cells = [row.name]
        for batch, by_case in results.items():
            r = by_case[row.name]
            per_s = batch / r["seconds"]
            speed = f"{1e3 * r['seconds']:.1f}" if batch == 1 else f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"
            cells += [speed, f"{r['time_ratio']:.3f}", f"{r['flop_ratio']:.3f}"]
        lines.append(f"| {' | '.join(cells)} |")
    return f"{size}:\n" + "\n".join(lines)


def rounds(asked: int, batch: int) -> int:
    """`asked` rounds up to batch 16, proportionally fewer above, at least 3 (or `asked` if fewer)."""
    return min(asked, max(3, asked * 16 // max(batch, 16)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="s16,fmnist", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model and batch size first")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per model and batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads [default: torch's, one per core]")
    args = parser.parse_args()
    keep_freed_memory()  # as `vmoe` does
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    plan = ", ".join(f"batch {b}: {rounds(args.rounds, b)}" for b in batches)
    print(f"{args.device}, {torch.get_num_threads()} threads, {args.warmup} warm-up pass, rounds {plan}")
    for size in args.sizes.split(","):
        rows = cases(size, args.device)
        results = {
            batch: measure(rows, batch, args.warmup, rounds(args.rounds, batch), args.device) for batch in batches
        }
        print(table(size, rows, results), flush=True)


if __name__ == "__main__":
    main()
