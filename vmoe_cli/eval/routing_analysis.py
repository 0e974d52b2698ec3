"""`vmoe routing`: what the routers of a trained V-MoE do on a split, counted from their own routing plans.

Open: the checkpoint (with routing overrides) and the data; run: one pass over the split, or its first N
images, reading every MoE block's `RouterOutput` (each token's K assignments `(expert, slot, weight)`, a slot
>= C being dropped; Soft MoE's dispatch weights); rows: counts per layer, never per token. They give the
expert load against capacity, drops by choice rank, how many experts process each token, the class x expert
shares of first choices and their normalised mutual information, the per-image decisions per class, and Soft
MoE's dispatch entropy per slot. Per-token detail is kept only for a handful of images, one per class, routed
again as one group for the patch maps: each patch's first-choice expert per layer, and which
patches keep a slot at a low capacity with and without Batch Priority Routing.

Everything goes into OUT itself: PNG figures (eval/routing_plots.py), the numbers behind them as CSV, and
`summary.json`, which lists the figures in order with a title and a one-sentence caption.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vmoe_cli.atomic import remove_stale_temps, write_text_atomic
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval import routing_plots
from vmoe_cli.eval.opening import EvalData, Opened, ProgressFn, eval_loader, open_checkpoint, open_data
from vmoe_cli.eval.plots import pyplot
from vmoe_cli.eval.routing_plots import PatchMaps
from vmoe_cli.models.routing import Plan
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.outputs import run_lock

SUMMARY = "summary.json"
PATCH_IMAGES = 8  # images in the patch maps: the first of each of the first classes met, routed as one group
LOW_CAPACITY = 0.5  # capacity factor of the BPR vs vanilla patch maps, at K=1 (the paper's cheapest setting)


@dataclass
class RoutingOptions:
    """What the analysis reads and how it routes."""

    split: str = "test"
    images: int | None = None  # the first N images of the split; None: all of them
    k: int | None = None  # routing overrides at inference; None keeps the checkpoint's
    capacity_factor: float | None = None
    bpr: bool | None = None
    dropless: bool | None = None  # every choice computed, nothing dropped (token-choice routers)
    batch_size: int = 256  # images per forward pass (routing groups as the checkpoint's)
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------------- counts


def first_choice(plan: Plan) -> Tensor:
    """Each token's first-choice expert `[G, S]`: rank 0 of token choice; the largest gate under expert choice,
    whose K = E assignments are the experts in order."""
    if plan.requested_GE is not None:  # token choice (per token, Sinkhorn or per image) ranks its choices
        return plan.expert_GSK[..., 0]
    return plan.weight_GSK.argmax(dim=-1)


def plan_counts(plan: Plan, labels_GS: Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """One layer's counts on one batch, from its plan: tokens, capacity slots per expert (G x C), choices placed
    per expert, tokens processed by 0..K experts, first choices per class x expert and, under token choice,
    the choices each expert received and the drops per choice rank."""
    G, S, K = plan.expert_GSK.shape
    E, kept_GSK = plan.num_experts, plan.kept_GSK
    experts_GS = kept_GSK.sum(dim=-1)
    pair_GS = labels_GS * E + first_choice(plan)
    counts = {
        "tokens": torch.tensor(G * S),
        "slots": torch.tensor(G * plan.capacity),
        "placed": torch.bincount(plan.expert_GSK[kept_GSK], minlength=E),
        "experts_per_token": torch.bincount(experts_GS.flatten(), minlength=K + 1),
        "class_expert": torch.bincount(pair_GS.flatten(), minlength=num_classes * E).view(num_classes, E),
    }
    if plan.requested_GE is not None:
        counts["requested"] = plan.requested_GE.sum(dim=0)
        counts["dropped_by_rank"] = (~kept_GSK).sum(dim=(0, 1))
    return {name: value.cpu().numpy().astype(np.int64) for name, value in counts.items()}


def soft_counts(dispatch_BNEP: Tensor) -> dict[str, np.ndarray]:
    """Soft MoE on one batch: images, and each slot's dispatch entropy (nats, over its image's tokens) summed
    over the images `[E, P]`."""
    p_BNEP = dispatch_BNEP.float()
    entropy_BEP = -(p_BNEP * p_BNEP.clamp(min=1e-30).log()).sum(dim=1)
    return {"images": np.int64(p_BNEP.shape[0]), "entropy": entropy_BEP.sum(dim=0).double().cpu().numpy()}


def image_counts(image_logits_BE: Tensor, labels_B: Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Per-image routing on one batch: images per class x first-choice expert `[classes, E]`."""
    E = image_logits_BE.shape[-1]
    pair_B = labels_B * E + image_logits_BE.argmax(dim=-1)
    return {"class_expert": torch.bincount(pair_B, minlength=num_classes * E).view(num_classes, E).cpu().numpy()}


def normalised_mutual_information(counts_CE: np.ndarray) -> float:
    """I(class; expert) / mean(H(class), H(expert)) of a contingency table: 0 when the expert says nothing about
    the class, 1 when each expert takes exactly the tokens of its own classes (0 too when either is constant)."""
    p = counts_CE / max(counts_CE.sum(), 1)
    p_C, p_E = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / np.outer(p_C, p_E)[nz])).sum())
    entropies = [-float((q[q > 0] * np.log(q[q > 0])).sum()) for q in (p_C, p_E)]
    mean = sum(entropies) / 2
    return max(0.0, mutual / mean) if min(entropies) > 0 else 0.0


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row as shares summing to 1; a row without counts stays 0."""
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def _add(tally: dict[str, Any], counts: dict[str, np.ndarray]) -> None:
    for name, value in counts.items():
        tally[name] = tally[name] + value if name in tally else value


# ---------------------------------------------------------------------------------------------------- the pass


@torch.inference_mode()
def count_batch(model: VisionTransformer, images: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """The counts of one batch: `layers` (block -> counts) and, under per-image routing, `images`; `correct`."""
    out = model(images)
    N = model.cfg.tokens_per_image
    layers = {}
    for block, route in out.routing.items():
        if route.plan is None:
            layers[block] = soft_counts(route.dispatch_BNEP)
            continue
        G, S, _ = route.plan.expert_GSK.shape
        labels_GS = labels.repeat_interleave(N).view(G, S)  # groups are consecutive tokens of the batch
        layers[block] = plan_counts(route.plan, labels_GS, num_classes)
    counts: dict[str, Any] = {"layers": layers, "correct": 0}
    if out.image_logits_BE is not None:
        counts["images"] = image_counts(out.image_logits_BE, labels, num_classes)
    if out.logits is not None and out.logits.shape[-1] == num_classes:
        counts["correct"] = int((out.logits.argmax(dim=-1) == labels).sum())
    return counts


def _pass(
    opened: Opened, source: EvalData, options: RoutingOptions, progress: ProgressFn | None
) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """The counts of the split's first `options.images` images, and the first image of each of the first
    PATCH_IMAGES classes met."""
    num_classes = len(source.manifest["classes"])
    total = source.manifest["splits"][options.split]["count"]
    limit = min(total, options.images or total)
    tally: dict[str, Any] = {"layers": {}, "images": {}, "correct": 0, "seen": 0}
    examples: dict[int, Tensor] = {}
    for images, labels in eval_loader(source.shard_dir, options.split, options.batch_size, opened.preprocess):
        images, labels = images[: limit - tally["seen"]], labels[: limit - tally["seen"]]
        counts = count_batch(opened.model, images.to(options.device), labels.to(options.device), num_classes)
        for block, layer in counts["layers"].items():
            _add(tally["layers"].setdefault(block, {}), layer)
        _add(tally["images"], counts.get("images", {}))
        tally["correct"] += counts["correct"]
        tally["seen"] += len(labels)
        for image, label in zip(images, labels.tolist(), strict=True):
            if len(examples) < PATCH_IMAGES and label not in examples:
                examples[label] = image.clone()  # a copy: a view would keep the whole batch alive
        if progress is not None:
            progress(f"routing {options.split}", tally["seen"], limit)
        if tally["seen"] >= limit:
            break
    return tally, examples


# ---------------------------------------------------------------------------------------------------- patch maps


@torch.inference_mode()
def patch_maps(opened: Opened, examples: dict[int, Tensor], device: str = "cpu") -> PatchMaps:
    """Route the example images (class order) as one batch: first choices and kept patches at the
    model's setting, then (where BPR applies) kept patches at K=1, cf LOW_CAPACITY, vanilla and BPR. The model
    keeps that last setting."""
    model = opened.model
    labels = sorted(examples)
    images = torch.stack([examples[c] for c in labels]).to(device)
    maps = PatchMaps(_pixels(images, opened.preprocess.mean, opened.preprocess.std), labels)
    for block, route in model(images).routing.items():
        if route.plan is not None:
            maps.first[block] = _grid(model, first_choice(route.plan))
            maps.kept[block] = _grid(model, route.plan.kept_GSK.any(dim=-1))
    if "bpr" in model.cfg.moe.kind.sweep_axes:
        for name, bpr in (("vanilla", False), ("bpr", True)):
            model.set_routing(k=1, capacity_factor=LOW_CAPACITY, bpr=bpr)
            maps.low[name] = {b: _grid(model, r.plan.kept_GSK.any(dim=-1)) for b, r in model(images).routing.items()}
    return maps


def _grid(model: VisionTransformer, per_token_GS: Tensor) -> np.ndarray:
    """A per-token value of a batch's groups as each image's patch grid `[B, h, w]` (the CLS token left out)."""
    cfg = model.cfg
    side = cfg.image_size // cfg.sizes()[4]
    per_token_BN = per_token_GS.reshape(-1, cfg.tokens_per_image)[:, int(cfg.pool == "cls") :]
    return per_token_BN.reshape(-1, side, side).cpu().numpy()


def _pixels(images_BCHW: Tensor, mean: float | list[float], std: float | list[float]) -> np.ndarray:
    """Normalised model inputs back to 0..1 pixels: `[B, H, W]` grey or `[B, H, W, 3]` colour."""
    mean_C11 = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_C11 = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    pixels = (images_BCHW.float().cpu() * std_C11 + mean_C11).clamp(0, 1)
    return pixels[:, 0].numpy() if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------------- results


def layer_summary(counts: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """One layer's numbers from its counts: shares of tokens, of capacity and of each class's tokens."""
    if "entropy" in counts:  # Soft MoE
        entropy_EP = counts["entropy"] / counts["images"]
        effective_EP = np.exp(entropy_EP)
        return {"slot_entropy_nats": entropy_EP.tolist(), "slot_effective_tokens": effective_EP.tolist(),
                "effective_tokens_mean": float(effective_EP.mean())}  # fmt: skip
    tokens, slots = int(counts["tokens"]), int(counts["slots"])
    hist = counts["experts_per_token"] / tokens
    return {
        "tokens": tokens,
        "capacity_slots_per_expert": slots,
        "load": (counts["placed"] / slots).tolist(),
        "requested": (counts["requested"] / slots).tolist() if "requested" in counts else None,
        "dropped_all": float(hist[0]),
        "dropped_any": float(1 - hist[k]) if "requested" in counts else float(hist[0]),
        "dropped_by_rank": (counts["dropped_by_rank"] / tokens).tolist() if "requested" in counts else None,
        "experts_per_token": {"0": float(hist[0]), "1": float(hist[1]), "2+": float(hist[2:].sum())},
        "class_expert_share": row_shares(counts["class_expert"]).tolist(),
        "class_tokens": counts["class_expert"].sum(axis=1).tolist(),
        "specialisation_nmi": normalised_mutual_information(counts["class_expert"]),
    }


def analyse_routing(
    checkpoint: str | Path,
    data: str,
    out_dir: str | Path,
    options: RoutingOptions | None = None,
    cache_dir: str | Path = "~/.cache/vmoe",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run the analysis and write its figures, CSV files and summary.json into `out_dir`; return the summary."""
    options = options or RoutingOptions()
    if options.images is not None and options.images < 1:
        raise VmoeError(f"--images {options.images}: give at least 1 image (or leave it out for the whole split)")
    pyplot()  # a missing matplotlib is one line before the pass, not after it
    with run_lock(out_dir) as out:
        remove_stale_temps(out)
        opened = open_moe(checkpoint, options)
        source = open_data(data, Path(cache_dir).expanduser(), [options.split], "pass --split")
        tally, examples = _pass(opened, source, options, progress)
        summary = _summary(opened, source, options, tally)
        # after the summary: the patch maps leave the model at their last, low-capacity setting
        maps = patch_maps(opened, examples, options.device) if opened.model.cfg.moe.kind.has_plan else None
        write_csvs(summary, maps, out)
        summary["figures"] = routing_plots.draw(summary, maps, LOW_CAPACITY, out)
        write_text_atomic(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def _summary(opened: Opened, source: EvalData, options: RoutingOptions, tally: dict[str, Any]) -> dict[str, Any]:
    """The numbers of summary.json (all but the figures) from the pass's counts."""
    moe, classes = opened.model.cfg.moe, source.manifest["classes"]
    summary = {
        "checkpoint": str(opened.name), "data": source.name, "split": options.split, "images": tally["seen"],
        "top1": tally["correct"] / tally["seen"] if opened.model.cfg.num_classes == len(classes) else None,
        "routing": {"router": moe.router, "axes": list(moe.kind.sweep_axes), "k": moe.k,
                    "capacity_factor": moe.capacity_factor, "capacity": moe.capacity, "bpr": moe.bpr,
                    "dropless": moe.dropless_at(training=False), "experts": moe.num_experts,
                    "tokens_per_image": opened.model.cfg.tokens_per_image},
        "classes": classes,
        "layers": {str(b): layer_summary(c, moe.k) for b, c in sorted(tally["layers"].items())},
    }  # fmt: skip
    if tally["images"]:
        summary["per_image"] = _per_image_summary(tally["images"]["class_expert"], moe.superclasses)
    return summary


def open_moe(checkpoint: str | Path, options: RoutingOptions) -> Opened:
    """The V-MoE of `checkpoint` on the device with the overrides applied; one line for a dense model, an override
    the router has no use for, or a K above its experts."""
    opened = open_checkpoint(checkpoint, "RUN_OR_CHECKPOINT")
    moe = opened.model.to(options.device).cfg.moe
    if moe is None:
        raise VmoeError(f"{checkpoint}: a dense model has no MoE layers to analyse; give a V-MoE run or checkpoint")
    overrides = {"k": options.k, "capacity_factor": options.capacity_factor, "bpr": options.bpr}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if options.dropless is not None and moe.kind.choice != "token":
        raise VmoeError(f"--dropless: the {moe.router} router drops no token's choice; drop --dropless")
    for name in overrides:
        if name not in moe.kind.sweep_axes:
            option = "--" + name.replace("_", "-")
            raise VmoeError(f"{option}: the {moe.router} router has no such setting; drop {option}")
    if overrides.get("k", 1) > moe.num_experts:
        raise VmoeError(f"--k {overrides['k']}: the model has only {moe.num_experts} experts")
    if options.dropless is not None:
        overrides["dropless"] = options.dropless
    if overrides:
        opened.model.set_routing(**overrides)
    return opened


def _per_image_summary(counts_CE: np.ndarray, superclasses: Any) -> dict[str, Any]:
    """Per-image routing: each class's images per expert and, when guided, per super-class and the share of
    images sent to their super-class's expert."""
    result: dict[str, Any] = {
        "class_expert_images": counts_CE.tolist(),
        "class_expert_share": row_shares(counts_CE).tolist(),
        "specialisation_nmi": normalised_mutual_information(counts_CE),
    }
    if isinstance(superclasses, list) and len(superclasses) == len(counts_CE):
        groups = np.zeros((counts_CE.shape[1], len(counts_CE)), dtype=np.int64)
        groups[superclasses, np.arange(len(counts_CE))] = 1
        group_expert = groups @ counts_CE  # [groups = E, E]
        result["superclasses"] = superclasses
        result["superclass_expert_share"] = row_shares(group_expert).tolist()
        result["images_to_superclass_expert"] = float(np.trace(group_expert) / max(group_expert.sum(), 1))
    return result


# ---------------------------------------------------------------------------------------------------- outputs


def write_csvs(summary: dict[str, Any], maps: PatchMaps | None, out: Path) -> None:
    """The numbers behind the figures, one CSV file each, written atomically into `out`."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    layers = summary["layers"]
    plans = {b: v for b, v in layers.items() if "load" in v}
    if plans:
        tables["load.csv"] = (["block", "expert", "load", "requested"], [
            [b, e, load, None if v["requested"] is None else v["requested"][e]]
            for b, v in plans.items() for e, load in enumerate(v["load"])
        ])  # fmt: skip
        tables["drops.csv"] = (["block", "choice", "dropped"], [
            [b, choice, share] for b, v in plans.items()
            for choice, share in [*enumerate(v["dropped_by_rank"] or [], 1), ("all", v["dropped_all"]),
                                  ("any", v["dropped_any"])]
        ])  # fmt: skip
        tables["experts-per-token.csv"] = (["block", "experts", "share"], [
            [b, n, share] for b, v in plans.items() for n, share in v["experts_per_token"].items()
        ])  # fmt: skip
        tables["classes.csv"] = (["block", "class", "expert", "share", "class_tokens"], [
            [b, summary["classes"][c], e, share, v["class_tokens"][c]]
            for b, v in plans.items() for c, row in enumerate(v["class_expert_share"]) for e, share in enumerate(row)
        ])  # fmt: skip
        tables["specialisation.csv"] = (["block", "nmi"], [[b, v["specialisation_nmi"]] for b, v in plans.items()])
    softs = {b: v for b, v in layers.items() if "slot_entropy_nats" in v}
    if softs:
        tables["soft-entropy.csv"] = (["block", "expert", "slot", "entropy_nats", "effective_tokens"], [
            [b, e, p, h, math.exp(h)] for b, v in softs.items()
            for e, row in enumerate(v["slot_entropy_nats"]) for p, h in enumerate(row)
        ])  # fmt: skip
    if "per_image" in summary:
        tables["per-image.csv"] = _per_image_table(summary)
    if maps is not None:
        tables["patches.csv"] = _patches_table(maps, summary["classes"])
    for name, (header, rows) in tables.items():
        write_text_atomic(out / name, _csv(header, rows))


def _per_image_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    info = summary["per_image"]
    groups = info.get("superclasses")
    rows = [
        [name, None if groups is None else groups[c], e, images, info["class_expert_share"][c][e]]
        for c, name in enumerate(summary["classes"]) for e, images in enumerate(info["class_expert_images"][c])
    ]  # fmt: skip
    return ["class", "superclass", "expert", "images", "share"], rows


def _patches_table(maps: PatchMaps, classes: list[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["image", "class", "block", "row", "col", "first_expert", "kept"]
    header += [f"kept_k1_cf{LOW_CAPACITY:g}_{name}" for name in maps.low]
    rows = []
    for block, first in maps.first.items():
        for i, row, col in np.ndindex(first.shape):
            low = [bool(kept[block][i, row, col]) for kept in maps.low.values()]
            label = classes[maps.labels[i]]
            rows.append([i, label, block, row, col, int(first[i, row, col]), bool(maps.kept[block][i, row, col]), *low])
    return header, rows


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    """CSV text: floats to 6 significant digits, booleans true/false, None empty."""

    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:.6g}" if isinstance(value, float) else value

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(v) for v in row] for row in rows)
    return text.getvalue()
