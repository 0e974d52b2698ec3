"""Benchmark the V-MoE block (forward + backward): time and peak memory against baselines.

Baselines, all in this one process and on the same inputs:
  dense   the dense MLP applied to as many tokens as the MoE computes buffer slots (E*G*C,
          which is K x cf x tokens up to the rounding of C): the physical limit, ratio 1.0;
  einsum  the same router and experts with one-hot einsum dispatch and combine, as the
          official JAX V-MoE and most PyTorch MoE layers do it (a [G, S, E, C] tensor);
  peers   st-moe-pytorch and mixture-of-experts from PyPI when installed, set to route every
          token to K=2 experts with GShard-style capacity K x cf (threshold_train=0,
          second_policy_train='all'), groups of the same size, plain GELU MLP experts.

Usage:  python scripts/bench_moe.py [--device cuda] [--rounds 3] [--block 4] [--experts 8 32]
"/ dense" is the median over rounds of the case's time over the dense case's time in the same round.
Peak memory on CPU is the growth of the process's resident set during one forward+backward,
measured in a fresh subprocess per case; on CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MlpOutput, MoEMlp
from vmoe_cli.models.routing import capacity
from vmoe_cli.models.vit import Mlp

WIDTH, HIDDEN, K, CF, GROUP_IMAGES, TOKENS = 384, 1536, 2, 1.25, 8, 197  # ViT-S width, the target's shape
DENSE, OURS = "dense MLP, same slots", "vmoe (index dispatch)"


class EinsumMoE(nn.Module):
    """vmoe's router and experts with one-hot einsum dispatch/combine (the JAX V-MoE way)."""

    def __init__(self, moe: MoEMlp):
        super().__init__()
        self.moe = moe

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        x_GSD = x_BND.reshape(-1, self.moe.cfg.group_tokens(B, N), D)
        routing = self.moe.router(x_GSD)
        plan = routing.plan
        E, C = plan.num_experts, plan.capacity
        slot_GSKC = F.one_hot(plan.slot_GSK.clamp(max=C), C + 1)[..., :C]  # dropped -> all zero
        expert_GSKE = F.one_hot(plan.expert_GSK, E)
        dispatch_GSEC = torch.einsum("gske,gskc->gsec", expert_GSKE.float(), slot_GSKC.float())
        combine_GSEC = torch.einsum("gske,gskc,gsk->gsec", expert_GSKE.float(), slot_GSKC.float(), plan.weight_GSK)
        G, S = x_GSD.shape[:2]
        buffers = torch.einsum("gsec,gsd->egcd", dispatch_GSEC.to(x_GSD.dtype), x_GSD).reshape(E, G * C, D)
        out = self.moe.experts(buffers).view(E, G, C, D)
        y_GSD = torch.einsum("egcd,gsec->gsd", out, combine_GSEC.to(out.dtype))
        return y_GSD.reshape(B, N, D) + 0 * routing.aux_loss


def peer_modules(num_experts: int) -> dict[str, Callable[[], nn.Module]]:
    """Factories for the installed peer libraries, configured to compute K x cf x tokens slots."""
    peers: dict[str, Callable[[], nn.Module]] = {}
    try:
        import st_moe_pytorch

        def st_moe() -> nn.Module:
            experts = nn.ModuleList(
                nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)) for _ in range(num_experts)
            )
            layer = st_moe_pytorch.MoE(
                WIDTH,
                num_experts=num_experts,
                gating_top_n=K,
                threshold_train=0.0,
                threshold_eval=0.0,
                capacity_factor_train=K * CF,
                capacity_factor_eval=K * CF,
                experts=experts,
            )
            return GroupedPeer(layer)

        peers["st-moe-pytorch"] = st_moe
    except ImportError:
        print("st-moe-pytorch not installed: skipped (pip install st-moe-pytorch)")
    try:
        import mixture_of_experts

        def moe_lib() -> nn.Module:
            layer = mixture_of_experts.MoE(
                WIDTH,
                num_experts=num_experts,
                hidden_dim=HIDDEN,
                activation=nn.GELU,
                second_policy_train="all",
                second_policy_eval="all",
                capacity_factor_train=K * CF,
                capacity_factor_eval=K * CF,
            )
            return GroupedPeer(layer)

        peers["mixture-of-experts"] = moe_lib
    except ImportError:
        print("mixture-of-experts not installed: skipped (pip install mixture-of-experts)")
    return peers


class GroupedPeer(nn.Module):
    """Feeds a peer layer `[G, S, D]` (its batch rows are routing groups) and keeps its output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        out = self.layer(x_BND.reshape(B // GROUP_IMAGES, GROUP_IMAGES * N, D))
        return out[0].reshape(B, N, D) + 0 * out[1]


def build_cases(num_experts: int, images: int) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """name -> (module factory, input shape). The dense case gets E*G*C tokens."""
    cfg = MoEConfig(num_experts=num_experts, k=K, capacity_factor=CF, group_images=GROUP_IMAGES, noise_std=1.0)
    slots = num_experts * (images // GROUP_IMAGES) * capacity(GROUP_IMAGES * TOKENS * K, num_experts, CF)
    cases = {
        DENSE: (lambda: Mlp(WIDTH, HIDDEN, "tanh", 0.0), (1, slots, WIDTH)),
        OURS: (lambda: MoEMlp(WIDTH, HIDDEN, cfg), (images, TOKENS, WIDTH)),
        "one-hot einsum": (lambda: EinsumMoE(MoEMlp(WIDTH, HIDDEN, cfg)), (images, TOKENS, WIDTH)),
    }
    for name, factory in peer_modules(num_experts).items():
        cases[name] = (factory, (images, TOKENS, WIDTH))
    return cases


def step_fn(module: nn.Module, shape: tuple[int, ...], device: str) -> Callable[[], None]:
    """One forward + backward of `module` on a fixed input and output gradient (no loss to compute,
    so the dense case, whose output has more rows, pays nothing extra); synchronised on CUDA."""
    module.to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)

    def step() -> None:
        out = module(x)
        if isinstance(out, MlpOutput) and out.routing is not None:  # vmoe: the auxiliary loss joins the backward
            torch.autograd.backward([out.y, out.routing.aux_loss], [grad, torch.ones((), device=device)])
        else:
            (out.y if isinstance(out, MlpOutput) else out).backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def time_cases(cases: dict, device: str, rounds: int, block: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward+backward, and each case's median over rounds of its time divided by
    the dense case's time in the same round.

    Each round runs every case for a block of consecutive steps, the first discarded: the steady state
    a training loop sees, without another case's allocations in between (freeing gigabytes makes the
    next steps page-fault fresh memory). Rounds interleave the cases, so drift hits all alike.
    """
    steps = {name: step_fn(factory(), shape, device) for name, (factory, shape) in cases.items()}
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()  # warm-up of the block
            block_times = []
            for _ in range(block):
                start = time.perf_counter()
                step()
                block_times.append(time.perf_counter() - start)
            times[name].append(block_times)
    medians = {name: [statistics.median(b) for b in blocks] for name, blocks in times.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(m, medians[DENSE], strict=True)) for name, m in medians.items()
    }
    return {name: statistics.median(t for b in blocks for t in b) for name, blocks in times.items()}, ratios


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident set (VmRSS) or its high-water mark (VmHWM, per address space, so reset by exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_memory(case: str, num_experts: int, images: int, device: str) -> int:
    """Peak extra memory of one forward+backward of `case` (bytes)."""
    factory, shape = build_cases(num_experts, images)[case]
    step = step_fn(factory(), shape, device)
    if device == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    step()
    return rss_bytes("VmHWM") - before


def peak_memory_subprocess(case: str, num_experts: int, images: int) -> int:
    """CPU peak measured in a fresh interpreter, so earlier cases' high-water mark does not count."""
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench_moe; "
        f"print(bench_moe.peak_memory({case!r}, {num_experts}, {images}, 'cpu'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all cases")
    parser.add_argument("--block", type=int, default=4, help="timed steps per case and round (after 1 warm-up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"D={WIDTH} H={HIDDEN} K={K} cf={CF} group={GROUP_IMAGES}x{TOKENS} tokens, {args.images} images")
    results = []
    for num_experts in args.experts:
        cases = build_cases(num_experts, args.images)
        times, ratios = time_cases(cases, args.device, args.rounds, args.block)
        mem = {}
        if not args.no_memory:
            for name in cases:
                if args.device == "cuda":
                    mem[name] = peak_memory(name, num_experts, args.images, "cuda")
                else:
                    mem[name] = peak_memory_subprocess(name, num_experts, args.images)
        print(f"\nE={num_experts}  C={capacity(GROUP_IMAGES * TOKENS * K, num_experts, CF)} per group")
        print(f"{'case':<26}{'median s':>10}{'/ dense':>9}{'vmoe faster':>12}{'peak MiB':>10}{'mem / dense':>12}")
        for name, seconds in times.items():
            peak = mem.get(name)
            peak_cols = f"{peak / 2**20:>10.0f}{peak / mem[DENSE]:>12.2f}" if peak else ""
            speedup = ratios[name] / ratios[OURS]
            print(f"{name:<26}{seconds:>10.3f}{ratios[name]:>9.2f}{speedup:>11.2f}x{peak_cols}")
            results.append(
                {
                    "experts": num_experts,
                    "case": name,
                    "seconds": seconds,
                    "ratio_dense": ratios[name],
                    "vmoe_speedup": speedup,
                    "peak_bytes": peak,
                }
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
