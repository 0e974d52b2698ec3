"""Train every router of the Fashion-MNIST recipes with the same budget and compare them side by side.

For each recipe (the dense twin, softmax token choice, expert choice, Soft MoE, Sinkhorn token and
expert choice, per-image routing with super-classes), all at the same expert slots per image:
pre-train for --steps steps (the recipe's schedule squeezed into them), then report test top-1,
10-shot ridge top-1 on the frozen features, measured images/s of the forward pass and analytic
GFLOPs per image. Runs that finished are reused, so an interrupted comparison picks up where it stopped.

    python scripts/compare_routers.py --shards shards/fmnist --steps 800
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from vmoe_cli.config import load_recipe
from vmoe_cli.eval.fewshot import load_backbone
from vmoe_cli.eval.flops import flops_per_image
from vmoe_cli.eval.opening import eval_loader, open_checkpoint
from vmoe_cli.eval.probe import run_fewshot
from vmoe_cli.eval.sweep import SweepOptions, time_forward
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "dense ViT": "fmnist-vit",
    "token choice": "fmnist-vmoe",
    "expert choice": "fmnist-expert-choice",
    "Soft MoE": "fmnist-soft",
    "Sinkhorn token choice": "fmnist-sinkhorn-tc",
    "Sinkhorn expert choice": "fmnist-sinkhorn-ec",
    "per image + super-classes": "fmnist-per-image",
}


def train_or_reuse(name: str, recipe_name: str, args: argparse.Namespace) -> dict:
    """Pre-train one recipe for `args.steps` steps (or reuse a finished run); its test top-1 and wall time."""
    overrides = [f"data.shards={args.shards}", f"train.steps={args.steps}", "train.eval_every=0",
                 "train.checkpoint_every=0", f"train.warmup_steps={args.steps // 16}"]  # fmt: skip
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", overrides)
    run = args.out / recipe_name
    record_file = run / "compare.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    shutil.rmtree(run, ignore_errors=True)  # an unfinished run starts over: every router gets the same schedule
    start = time.perf_counter()
    result = pretrain(recipe, run)
    seconds = time.perf_counter() - start
    record = {"name": name, "recipe": recipe_name, "test_top1": result["eval_top1"], "train_seconds": seconds}
    record_file.write_text(json.dumps(record))
    return record


def measure(record: dict, args: argparse.Namespace) -> dict:
    """10-shot top-1, images/s and GFLOPs of a trained run."""
    run = args.out / record["recipe"]
    backbone = load_backbone(str(run))
    fewshot = run_fewshot(backbone, [str(args.shards)], [10], seeds=3, cache_dir=args.cache_dir)
    record["fewshot10_top1"] = fewshot["datasets"][str(args.shards)]["summary"][10]["mean"]
    opened = open_checkpoint(run)
    model = opened.model
    images = next(iter(eval_loader(args.shards, "test", args.batch, opened.preprocess)))[0]
    with torch.inference_mode():
        record.update(time_forward(model, images, SweepOptions(repeats=args.repeats)))
    record["gflops"] = flops_per_image(model.cfg, args.batch) / 1e9
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("shards/fmnist"))
    parser.add_argument("--steps", type=int, default=800, help="training steps per router (same budget for all)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-routers"))
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vmoe").expanduser())
    parser.add_argument("--batch", type=int, default=64, help="images per timed forward pass")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=list(RECIPES), help="names of RECIPES to run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.only:
        record = measure(train_or_reuse(name, RECIPES[name], args), args)
        rows.append(record)
        print(json.dumps(record), flush=True)
    print(f"\nFashion-MNIST, {args.steps} steps of batch 128 each, {torch.get_num_threads()} threads")
    print("| router | test top-1 % | 10-shot % | images/s | GFLOPs/image | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        seconds = f"{r['train_seconds']:.0f}"
        print(f"| {r['name']} | {100 * r['test_top1']:.2f} | {100 * r['fewshot10_top1']:.1f} | "
              f"{r['images_per_s']:,.0f} | {r['gflops']:.4f} | {seconds} |")  # fmt: skip
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
