#!/usr/bin/env bash
# The README's main command: set up .venv, then run the whole pipeline on the embedded default,
# scikit-learn's digits (vmoe quickstart): shard -> pre-train a tiny V-MoE and its dense twin ->
# few-shot probes -> capacity sweep with plot. A few minutes on a laptop CPU; rerunning resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/vmoe quickstart "$@"
