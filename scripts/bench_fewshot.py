"""Benchmark `vmoe fewshot`: feature extraction vs the probe solve, and ridge vs logistic on the same features.

For each DATA: extract the checkpoint's features into a fresh cache (timed), then solve the ridge probe for
every shot count x seed x the 30 L2 values of the grid (timed; one eigendecomposition per fit), then the
scikit-learn logistic probe on the same features and grid (timed). Accuracy is the test mean over seeds.

Usage:  python scripts/bench_fewshot.py --checkpoint runs/fmnist-vmoe shards/fmnist digits [--seeds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vmoe_cli.eval.fewshot import load_backbone
from vmoe_cli.eval.probe import dataset_features, probe, summarize

SHOTS = (1, 5, 10, 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    backbone = load_backbone(args.checkpoint)
    print(f"checkpoint {args.checkpoint}, shots {SHOTS}, {args.seeds} seeds, threads {torch.get_num_threads()}")
    print("| data | images | extract s | ridge solve s | logistic s | ridge top-1 % (1/5/10/25) | logistic top-1 % |")
    print("|---|---:|---:|---:|---:|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for data in args.data:
            features = dataset_features(backbone, data, cache)  # its .seconds times the extraction only
            timed = {}
            for kind in ("ridge", "logistic"):
                start = time.perf_counter()
                rows = probe(features, SHOTS, args.seeds, kind=kind)
                timed[kind] = (time.perf_counter() - start, summarize(rows))
            images = len(features.train_y) + len(features.test_y)
            acc = {k: "/".join(f"{100 * v['mean']:.1f}" for v in s.values()) for k, (_, s) in timed.items()}
            print(f"| {data} | {images:,} | {features.seconds:.1f} | {timed['ridge'][0]:.2f} | "
                  f"{timed['logistic'][0]:.1f} | {acc['ridge']} | {acc['logistic']} |")  # fmt: skip


if __name__ == "__main__":
    main()
