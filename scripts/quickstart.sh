#!/usr/bin/env bash
# Set up .venv, then run the main job on the embedded default recipes.
# Today: shard scikit-learn's digits into shards/digits (rerunning finds the job complete), then the
# model cards of the tiny digits V-MoE and the paper's V-MoE-S/32; training, few-shot and capacity
# sweeps join here as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/vmoe shard digits --out shards/digits --minival 0.1 --shard-size 200
.venv/bin/vmoe shard-info shards/digits --verify
.venv/bin/vmoe model-info recipes/digits-vmoe.yaml
.venv/bin/vmoe model-info recipes/vmoe-s32-last2.yaml
