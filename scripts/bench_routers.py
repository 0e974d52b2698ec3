"""Benchmark the routers alone and the MoE block around them, at ViT-S/16 shape, against expert choice.

One routing call (logits -> plan) and one MoE block forward for each router kind that places tokens, on the
same tokens: groups of 8 images x 197 tokens of width 384, E experts; token-choice kinds at K=2 and cf 1.05,
expert-choice kinds at cf 2.1 (the same buffer slots). Evaluation mode, no gradient: the plan is made the same
way in training, where only the gradient of the combine weights is added.

Usage:  python scripts/bench_routers.py [--images 8] [--experts 8] [--rounds 5] [--threads 1] [--device cuda]
"/ expert choice" is the median over rounds of the kind's time over expert choice's time in the same round. On
CPU the time is the process's CPU time (`time.process_time`, one thread by default), so that neighbours sharing
the machine do not count; on CUDA it is wall time, synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vmoe_cli.models.config import ROUTER_KINDS, MoEConfig
from vmoe_cli.models.moe import MoEMlp

WIDTH, HIDDEN, TOKENS, GROUP_IMAGES, K, CF = 384, 1536, 197, 8, 2, 1.05
BASELINE = "expert_choice"


def block_for(router: str, num_experts: int, device: str) -> MoEMlp:
    """An MoE block with `router`: the same slots per group whoever chooses."""
    choice = ROUTER_KINDS[router].choice
    cf = CF if choice == "token" else K * CF
    cfg = MoEConfig(router=router, num_experts=num_experts, k=K, capacity_factor=cf, group_images=GROUP_IMAGES)
    return MoEMlp(WIDTH, HIDDEN, cfg).to(device).eval()


def calls(block: MoEMlp, x_BND: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The router alone (on the block's groups) and the whole block."""
    x_GSD = x_BND.reshape(-1, GROUP_IMAGES * TOKENS, WIDTH)
    return {"router": lambda: block.router(x_GSD).plan, "block": lambda: block(x_BND).y}


def timed(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one warm-up: CPU time on CPU, wall time on CUDA."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per call (a multiple of 8)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_BND = torch.randn(args.images, TOKENS, WIDTH, device=args.device)
    routers = [name for name, kind in ROUTER_KINDS.items() if kind.has_plan and not kind.per_image]
    cases = {name: calls(block_for(name, args.experts, args.device), x_BND) for name in routers}
    seconds = {(name, part): [] for name in routers for part in ("router", "block")}
    with torch.no_grad():
        for _ in range(args.rounds):  # rounds interleave the kinds, so drift hits all alike
            for name, parts in cases.items():
                for part, fn in parts.items():
                    seconds[name, part].append(timed(fn, args.device))
    print(f"{args.images} images x {TOKENS} tokens, width {WIDTH}, E={args.experts}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")  # fmt: skip
    print(f"| router | router ms | / {BASELINE} | MoE block ms | / {BASELINE} |")
    print("|---|---:|---:|---:|---:|")
    for name in routers:
        row = [name]
        for part in ("router", "block"):
            mine, base = seconds[name, part], seconds[BASELINE, part]
            ratio = statistics.median(a / b for a, b in zip(mine, base, strict=True))
            row += [f"{1e3 * statistics.median(mine):.1f}", f"{ratio:.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
