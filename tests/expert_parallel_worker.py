"""Run under torchrun (gloo, CPU): the expert-parallel model against the single-process model on the same data.

Every rank builds the same model (same seed), keeps a full copy as the single-process reference, shards the
other one over `train.expert_parallel` ranks and wraps it in DDP as training does. Rank r's micro-batch is
slice r of one global batch, and its router noise is seeded by (step, r) in both models, so the reference is
exactly the single-process computation of the mean loss over the global batch. Each check prints one JSON
line with the largest relative difference it measured; the test reads them. Usage:
    torchrun --nproc_per_node W tests/expert_parallel_worker.py N
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vmoe_cli.models.config import ModelConfig, MoEConfig
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.train.expert_parallel import clip_grad_norm, expert_parallel, reduce_expert_grads, shard_model

MICRO = 4  # images per rank
ROUTERS = {
    "token_choice": {},
    "token_choice_bpr": {"bpr": True, "capacity_factor": 0.5},  # capacity short: BPR decides who is dropped
    "expert_choice": {"router": "expert_choice"},
    "sinkhorn_token_choice": {"router": "sinkhorn_token_choice"},
    "sinkhorn_expert_choice": {"router": "sinkhorn_expert_choice"},
    "per_image": {"router": "per_image", "k": 1},
    "soft": {"router": "soft", "capacity_factor": 1.0},
    "all_to_rank_0": {"noise_std": 0.0},  # router weights zeroed below: every token picks experts 0 and 1
}


def build(settings: dict, world: int) -> tuple[VisionTransformer, torch.Tensor, torch.Tensor]:
    """The model (same init on every rank) and one global batch of images and labels."""
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "k": 2, "group_images": 2, "layers": "every-2", **settings})
    pool = "gap" if moe.router == "soft" else "cls"
    cfg = ModelConfig(variant="nano/2", image_size=8, channels=1, num_classes=10, pool=pool, moe=moe)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:  # experts that differ, so that a token at the wrong expert shows
                p.add_(0.1 * torch.randn_like(p))
            if "router.proj" in name and "noise_std" in settings:
                p.zero_()
    return model, torch.randn(world * MICRO, 1, 8, 8), torch.randint(0, 10, (world * MICRO,))


def loss_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple:
    torch.manual_seed(seed)
    out = model(images)
    return F.cross_entropy(out.logits, labels) + out.aux_loss, out.logits


def reference_step(model: VisionTransformer, images, labels, world: int, step: int) -> list[torch.Tensor]:
    """Single process: the mean loss over the global batch (micro-batch r with rank r's noise); logits per rank."""
    logits = []
    for r in range(world):
        part = slice(r * MICRO, (r + 1) * MICRO)
        loss, out = loss_of(model, images[part], labels[part], 1000 * step + r)
        (loss / world).backward()
        logits.append(out.detach())
    return logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def compare_grads(ep_model, ref_model, xp) -> float:
    """The largest relative difference over every parameter's gradient (experts: this rank's slice)."""
    worst = 0.0
    ref = dict(ref_model.named_parameters())
    for name, p in ep_model.module.named_parameters():
        want = ref[name].grad
        if "experts" in name:
            want = want[xp.replica.local_experts(want.shape[0])]
        worst = max(worst, rel(p.grad, want))
    return worst


def check_one_step(name: str, settings: dict, n: int, rank: int, world: int) -> dict:
    """(a) outputs, loss and every gradient of one training step."""
    ref_model, images, labels = build(settings, world)
    ep_model = copy.deepcopy(ref_model)
    ref_model.train(), ep_model.train()
    ref_logits = reference_step(ref_model, images, labels, world, 0)
    xp = expert_parallel(n, 4, world, rank)
    shard_model(ep_model, xp)
    ddp = DistributedDataParallel(ep_model)
    part = slice(rank * MICRO, (rank + 1) * MICRO)
    loss, logits = loss_of(ddp, images[part], labels[part], rank)
    loss.backward()
    reduce_expert_grads(ddp, xp)
    grads = compare_grads(ddp, ref_model, xp)
    return {"check": f"step {name}", "logits": rel(logits.detach(), ref_logits[rank]), "grads": grads}


def check_training(n: int, rank: int, world: int, steps: int = 3) -> dict:
    """(b) several SGD steps with momentum and gradient clipping: the weights match the single-process run's.

    SGD, not Adam: Adam turns the rounding noise of a gradient that is exactly zero in theory (the key bias of
    attention) into full-size steps of either sign, in DDP alone as much as under expert parallelism."""
    ref_model, images, labels = build({}, world)
    ep_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    xp = expert_parallel(n, 4, world, rank)
    shard_model(ep_model, xp)
    ddp = DistributedDataParallel(ep_model)
    ep_opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    part = slice(rank * MICRO, (rank + 1) * MICRO)
    for step in range(steps):
        reference_step(ref_model, images, labels, world, step)
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref_opt.step(), ref_opt.zero_grad()
        loss, _ = loss_of(ddp, images[part], labels[part], 1000 * step + rank)
        loss.backward()
        reduce_expert_grads(ddp, xp)
        clip_grad_norm(ddp, 0.5, xp)
        ep_opt.step(), ep_opt.zero_grad()
    ref = dict(ref_model.named_parameters())
    worst = 0.0
    for name, p in ep_model.named_parameters():
        want = ref[name].detach()
        want = want[xp.replica.local_experts(want.shape[0])] if "experts" in name else want
        worst = max(worst, rel(p.detach(), want))
    return {"check": f"train {steps} steps", "weights": worst}


def main() -> None:
    n = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [check_one_step(name, settings, n, rank, world) for name, settings in ROUTERS.items()]
    results.append(check_training(n, rank, world))
    for result in results:  # the worst over all ranks
        for key, value in result.items():
            if isinstance(value, float):
                worst = torch.tensor([value], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                result[key] = float(worst)
        if rank == 0:
            print(json.dumps({"world": world, "n": n, **result}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
