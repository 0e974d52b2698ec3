#!/usr/bin/env bash
# Create .venv if missing and install vmoe into it (editable, with the test and plot extras).
# Safe to rerun: the editable install is redone only when pyproject.toml changed since the last one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    echo "creating .venv"
    python3 -m venv .venv
fi
# torch first and pinned: 2.13.0 resolves to the CPU build here; a plain `torch` would pull GBs of CUDA wheels.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
if [[ ! -x .venv/bin/vmoe || pyproject.toml -nt .venv/.vmoe-installed ]]; then
    echo "installing vmoe into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,plot]"
    touch .venv/.vmoe-installed
fi
