#!/usr/bin/env bash
# Set up .venv, then run the main job on the embedded default recipes.
# Today that is the model cards of the tiny digits V-MoE and the paper's V-MoE-S/32;
# sharding, training, few-shot and capacity sweeps join here as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/vmoe model-info recipes/digits-vmoe.yaml
.venv/bin/vmoe model-info recipes/vmoe-s32-last2.yaml
