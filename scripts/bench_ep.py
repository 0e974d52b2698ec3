"""Benchmark expert parallelism per MoE layer: the token exchange against the expert matmuls, measured and on paper.

Measured (the default): one MoE layer at ViT-S/16 width (D=384, H=1536, E=8, K=2, cf=1.25, routing groups of
8 images x 197 tokens, `--images` per rank), its experts spread over the N ranks of a torchrun job. Every rank
holds fixed `[E, R, D]` buffers (R = groups x C, C the capacity per group), as the router fills them. Timed,
forward + backward, on fixed random buffers and output gradients:
  exchange  send_to_owners + return_to_senders (models/expert_parallel.py): two all_to_all_single forward,
            their two mirrors in backward, and nothing else;
  experts   the rank's L = E/N experts (models/moe.py: Experts.mlp) on the `[L, N*R, D]` rows it receives;
  layer     both as Experts.forward runs them under expert parallelism (a check: about exchange + experts).
Each round runs every case for a block of `--block` steps after one warm-up, every step starting from a
barrier; a rank's figure for the round is its median step, the round's figure the slowest rank's. The table
shows medians over `--rounds`; "exch / experts" is the median over rounds of the two in the same round.
"MB fwd" and "MB bwd" are the bytes a rank sends to the other ranks per layer (fp32): (N-1)/N of the buffers,
twice each way. With N=1 the exchange is a no-op baseline (a copy through the group of one).
On CPU (gloo) the exchange goes through shared memory and loopback TCP on one machine, and N ranks share its
cores (threads per rank = cores / N, at least 1), so the figures show the mechanics, not a GPU interconnect.

On paper (`--model`): no processes. For V-MoE-B/16, L/16 and H/14 (224 px, an MoE layer every other block,
bf16, K=2, cf=1.05) at 8 .. 1024 GPUs (8 per node), the bytes each GPU moves per training step for the
experts' sake, and the time that takes, under
  EP    expert parallelism over N = min(E, GPUs) GPUs: the token exchange, 2 x K x cf x D x 2 bytes per token
        per MoE layer forward (to the experts and back) and as much backward, (N-1)/N of it leaving the GPU,
        split over its peers evenly: those in its node over NVLink, the rest over the inter-node link, both
        at once (time = the slower of the two); plus, beyond N GPUs, the all-reduce of each expert's gradient
        over its GPUs/N replicas (ring, 2 (r-1)/r of the local experts' bytes, one replica per node: inter-node);
  FSDP  no expert parallelism, every MoE layer's E x 2 x D x H expert weights sharded over all GPUs: all-gathered
        in forward and again in backward, gradients reduce-scattered; ring, (W-1)/W of the bytes each,
        at NVLink speed within one node and at the inter-node link's beyond.
Expert compute per step = 3 x forward FLOPs of the expert matmuls (4 x K x cf x D x H per token per MoE layer)
at `--mfu` of `--peak` TFLOP/s; a step's expert part takes comm + compute without overlap, max(comm, compute)
with it. Attention and the dense layers cost the same under both and are left out.

Usage:  python scripts/bench_ep.py [--procs 1,2,4] [--images 8] [--rounds 3] [--block 2] [--json FILE]
        torchrun --nproc_per_node N scripts/bench_ep.py [...]       (one N; what --procs launches per N)
        python scripts/bench_ep.py --model [--batch 32] [--mfu 0.4] [--peak 900] [--nvlink 900] [--internode 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vmoe_cli.models.expert_parallel import ExpertGroup, return_to_senders, send_to_owners
from vmoe_cli.models.moe import Experts
from vmoe_cli.models.routing import capacity

WIDTH, HIDDEN, EXPERTS, K, CF, GROUP_IMAGES, TOKENS = 384, 1536, 8, 2, 1.25, 8, 197  # ViT-S/16, as bench_moe
CASES = ("exchange", "experts", "layer")


def step_fns(ep: ExpertGroup, rows: int) -> dict[str, Callable[[], None]]:
    """One forward + backward of each case on fixed random inputs and output gradients, as closures."""
    E, N, L = EXPERTS, ep.size, EXPERTS // ep.size
    experts = Experts(E, WIDTH, HIDDEN, "tanh", 0.0, "random").train()
    experts.shard(ep)  # keeps this rank's L experts; its forward exchanges rows with the group
    x_ERD = torch.randn(E, rows, WIDTH, requires_grad=True)
    grad_ERD = torch.randn(E, rows, WIDTH)
    x_LXD = torch.randn(L, N * rows, WIDTH, requires_grad=True)  # what send_to_owners hands this rank
    grad_LXD = torch.randn(L, N * rows, WIDTH)

    def exchange() -> None:
        return_to_senders(send_to_owners(x_ERD, ep), ep).backward(grad_ERD)
        x_ERD.grad = None

    def local() -> None:
        experts.mlp(x_LXD).backward(grad_LXD)
        experts.zero_grad(set_to_none=True)
        x_LXD.grad = None

    def layer() -> None:
        experts(x_ERD).backward(grad_ERD)
        experts.zero_grad(set_to_none=True)
        x_ERD.grad = None

    return dict(zip(CASES, (exchange, local, layer), strict=True))


def time_cases(steps: dict[str, Callable[[], None]], rounds: int, block: int) -> dict[str, list[float]]:
    """Per case, seconds per step in every round: the slowest rank's median of its block (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            dist.barrier()
            step()  # warm-up of the block
            block_times = []
            for _ in range(block):
                dist.barrier()
                start = time.perf_counter()
                step()
                block_times.append(time.perf_counter() - start)
            slowest = torch.tensor([statistics.median(block_times)], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[name].append(slowest.item())
    return times


def measure(args: argparse.Namespace) -> None:
    """One N, under torchrun: rank 0 prints its row and writes it to `--json`."""
    dist.init_process_group("gloo")
    N, rank = dist.get_world_size(), dist.get_rank()
    if EXPERTS % N:
        raise SystemExit(f"{N} ranks: E={EXPERTS} experts do not split evenly")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // N))
    torch.manual_seed(rank)
    ep = ExpertGroup(dist.group.WORLD, N, rank)
    groups = max(1, args.images // GROUP_IMAGES)
    rows = groups * capacity(GROUP_IMAGES * TOKENS * K, EXPERTS, CF)
    times = time_cases(step_fns(ep, rows), args.rounds, args.block)
    buffer_bytes = EXPERTS * rows * WIDTH * 4
    sent = 2 * (N - 1) / N * buffer_bytes  # per direction of the pass: to the owners and back
    row = {
        "ranks": N,
        "threads": torch.get_num_threads(),
        "rows_per_expert": rows,
        "mb_fwd": sent / 1e6,
        "mb_bwd": sent / 1e6,
        **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()},
        "exchange_over_experts": statistics.median(
            a / b for a, b in zip(times["exchange"], times["experts"], strict=True)
        ),
    }
    if rank == 0:
        print_measured([row], groups * GROUP_IMAGES)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def print_measured(rows: list[dict], images: int) -> None:
    print(
        f"D={WIDTH} H={HIDDEN} E={EXPERTS} K={K} cf={CF} group={GROUP_IMAGES}x{TOKENS} tokens, {images} images "
        f"per rank, {rows[0]['rows_per_expert']} rows per expert per rank, gloo, {os.cpu_count()} cores"
    )
    print("| N | threads/rank | MB fwd | MB bwd | exchange ms | experts ms | layer ms | exch / experts |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['threads']} | {r['mb_fwd']:.1f} | {r['mb_bwd']:.1f} | {r['exchange_ms']:.1f} | "
            f"{r['experts_ms']:.1f} | {r['layer_ms']:.1f} | {r['exchange_over_experts']:.3f} |"
        )


def launch(args: argparse.Namespace, forwarded: list[str]) -> None:
    """torchrun this script once per N of `--procs`, then print one table of all of them."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(p) for p in args.procs.split(",")):
            out = os.path.join(tmp, f"{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            subprocess.run([*cmd, os.path.abspath(__file__), *forwarded, "--json", out], check=True)
            with open(out) as f:
                rows.append(json.load(f))
    print("\nall N:")
    print_measured(rows, max(1, args.images // GROUP_IMAGES) * GROUP_IMAGES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


@dataclass(frozen=True)
class PaperModel:
    name: str
    depth: int
    width: int
    hidden: int
    tokens: int  # per image, CLS included
    experts: int

    @property
    def moe_layers(self) -> int:
        return self.depth // 2  # every other block


MODELS = (
    PaperModel("V-MoE-B/16", 12, 768, 3072, 197, 8),
    PaperModel("V-MoE-L/16", 24, 1024, 4096, 197, 8),
    PaperModel("V-MoE-H/14", 32, 1280, 5120, 257, 32),
)
PAPER_K, PAPER_CF, BYTES, PER_NODE = 2, 1.05, 2, 8


def paper_row(m: PaperModel, gpus: int, args: argparse.Namespace) -> dict:
    """Bytes per GPU per training step and seconds, EP against FSDP, for one model at `gpus` GPUs."""
    nvlink, internode = args.nvlink * 1e9, args.internode * 1e9
    tokens = args.batch * m.tokens
    n = min(m.experts, gpus)
    # EP token exchange: to the experts and back, forward and backward
    a2a = m.moe_layers * 2 * 2 * PAPER_K * PAPER_CF * m.width * BYTES * tokens * (n - 1) / n
    in_node = min(n, PER_NODE) - 1  # peers in this GPU's node, of the n - 1 it sends to
    a2a_s = max(a2a * in_node / max(n - 1, 1) / nvlink, a2a * (n - in_node - 1) / max(n - 1, 1) / internode)
    expert_bytes = 2 * m.width * m.hidden * BYTES  # one expert's two kernels
    replicas = gpus // n
    ep_grad = m.moe_layers * (m.experts // n) * expert_bytes * 2 * (replicas - 1) / replicas
    ep_s = a2a_s + ep_grad / internode
    # FSDP: all-gather forward, all-gather backward, reduce-scatter gradients, over all GPUs
    fsdp = m.moe_layers * 3 * m.experts * expert_bytes * (gpus - 1) / gpus
    fsdp_s = fsdp / (nvlink if gpus <= PER_NODE else internode)
    compute_s = 3 * m.moe_layers * 4 * PAPER_K * PAPER_CF * m.width * m.hidden * tokens / (args.mfu * args.peak * 1e12)
    return {
        "gpus": gpus,
        "n": n,
        "ep_bytes": a2a + ep_grad,
        "ep_grad_bytes": ep_grad,
        "fsdp_bytes": fsdp,
        "ep_s": ep_s,
        "fsdp_s": fsdp_s,
        "compute_s": compute_s,
        "ep_serial_s": ep_s + compute_s,
        "ep_overlap_s": max(ep_s, compute_s),
        "fsdp_serial_s": fsdp_s + compute_s,
        "fsdp_overlap_s": max(fsdp_s, compute_s),
    }


def crossover_batch(m: PaperModel, gpus: int, args: argparse.Namespace) -> float:
    """Images per GPU at which EP's communication time equals FSDP's (EP's grows linearly with the batch)."""
    at = [paper_row(m, gpus, argparse.Namespace(**{**vars(args), "batch": b})) for b in (0, 1)]
    return (at[0]["fsdp_s"] - at[0]["ep_s"]) / (at[1]["ep_s"] - at[0]["ep_s"])


def on_paper(args: argparse.Namespace) -> None:
    print(
        f"per-GPU batch {args.batch} images, K={PAPER_K}, cf={PAPER_CF}, bf16, {PER_NODE} GPUs per node, "
        f"NVLink {args.nvlink:g} GB/s, inter-node {args.internode:g} GB/s per GPU, "
        f"expert compute at {args.mfu:g} x {args.peak:g} TFLOP/s; times per training step, experts' share only"
    )
    gpus = [2**i for i in range(3, 11)]
    for m in MODELS:
        print(
            f"\n{m.name}: {m.depth} blocks, D={m.width}, H={m.hidden}, {m.tokens} tokens, {m.moe_layers} MoE layers, "
            f"E={m.experts}"
        )
        print(
            "| GPUs | EP N | EP GB/GPU (grad) | FSDP GB/GPU | EP comm ms | FSDP comm ms | expert ms "
            "| EP serial / overlap ms | FSDP serial / overlap ms | wins |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for g in gpus:
            r = paper_row(m, g, args)
            wins = "EP" if r["ep_s"] < r["fsdp_s"] else "FSDP"
            if max(r["ep_s"], r["fsdp_s"]) <= r["compute_s"]:
                wins += ", both hidden by overlap"
            print(
                f"| {g} | {r['n']} | {r['ep_bytes'] / 1e9:.3f} ({r['ep_grad_bytes'] / 1e9:.3f}) | "
                f"{r['fsdp_bytes'] / 1e9:.3f} | {1e3 * r['ep_s']:.2f} | {1e3 * r['fsdp_s']:.2f} | "
                f"{1e3 * r['compute_s']:.2f} | {1e3 * r['ep_serial_s']:.2f} / {1e3 * r['ep_overlap_s']:.2f} | "
                f"{1e3 * r['fsdp_serial_s']:.2f} / {1e3 * r['fsdp_overlap_s']:.2f} | {wins} |"
            )
    print("\nsummary (FSDP's expert traffic does not grow with the batch, EP's does):")
    for m in MODELS:
        parts = []
        for g in (PER_NODE, gpus[-1]):
            b = crossover_batch(m, g, args)
            parts.append(f"at {g} GPUs EP wins below {b:.0f} images per GPU, FSDP above")
        print(f"  {m.name}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="the model on paper, no processes")
    parser.add_argument("--procs", default="1,2,4", help="ranks per run, comma-separated (without torchrun)")
    parser.add_argument("--images", type=int, default=GROUP_IMAGES, help="images per rank (groups of 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all cases")
    parser.add_argument("--block", type=int, default=2, help="timed steps per case and round (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank [default: cores / N]")
    parser.add_argument("--json", help="also write the results to this JSON file")
    paper = parser.add_argument_group("--model")
    paper.add_argument("--batch", type=int, default=32, help="images per GPU per step")
    paper.add_argument("--mfu", type=float, default=0.4, help="fraction of peak the expert matmuls reach")
    paper.add_argument("--peak", type=float, default=900.0, help="bf16 peak TFLOP/s per GPU")
    paper.add_argument("--nvlink", type=float, default=900.0, help="GB/s per GPU within a node")
    paper.add_argument("--internode", type=float, default=50.0, help="GB/s per GPU between nodes")
    args = parser.parse_args()
    if args.model:
        on_paper(args)
    elif "RANK" in os.environ:
        measure(args)
    else:
        forwarded = [f"--images={args.images}", f"--rounds={args.rounds}", f"--block={args.block}"]
        launch(args, [*forwarded, f"--threads={args.threads}"])


if __name__ == "__main__":
    main()
