#!/usr/bin/env bash
# Set up .venv, then run the main job on the embedded default, scikit-learn's digits:
# shard them into shards/digits, pre-train the tiny V-MoE and its dense twin into runs/quickstart/,
# and print the model card. Rerunning finds the shards complete and continues finished runs.
# Few-shot probing and the capacity sweep join here as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
vmoe=.venv/bin/vmoe
$vmoe shard digits --out shards/digits --minival 0.1 --test 0.2 --shard-size 200
$vmoe shard-info shards/digits --verify
$vmoe model-info recipes/digits-vmoe.yaml
for recipe in digits-vmoe digits-vit; do
    run=runs/quickstart/$recipe
    resume=()
    [[ -f $run/checkpoints/last ]] && resume=(--resume latest)
    $vmoe pretrain recipes/$recipe.yaml --out "$run" "${resume[@]}"
done
echo "shards: shards/digits; runs: runs/quickstart/digits-vmoe, runs/quickstart/digits-vit (metrics.jsonl, checkpoints/)"
