#!/usr/bin/env bash
# Set up .venv, then run the test suite; arguments go to pytest (e.g. `bash scripts/test.sh -k config`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
