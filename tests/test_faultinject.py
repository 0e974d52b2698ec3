"""The fault-injection script, small: every command killed once at a random moment recovers to the uninterrupted
run's result (`python scripts/faultinject.py --kills 25` is the full version)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_killed_once_recovers_to_the_uninterrupted_result(tmp_path):
    command = [sys.executable, "scripts/faultinject.py", "--kills", "1", "--seed", "1", "--work", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [line["command"] for line in lines[:-1]] == ["shard", "pretrain", "sweep", "fewshot"]
    assert lines[-1] == {"kills": 4, "recovered": 4, "corrupt": 0, "failed": 0}
