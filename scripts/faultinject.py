"""Fault injection: kill vmoe commands with SIGKILL at random moments, rerun them, compare with an uninterrupted run.

For each command (`shard` of a generated image folder, `pretrain` of the digits V-MoE with checkpoints every 10
steps, `sweep-capacity` and `fewshot` of its checkpoint) the script first runs it once uninterrupted and keeps
the digest of what it produced. Then, `--kills` times: a fresh output, the command started in its own process
group, SIGKILL to the whole group (workers included) at a moment drawn uniformly between the Python start-up
and the uninterrupted run's duration, then the same command run again to the end (`pretrain` with
`--resume latest` when a checkpoint survived). Each trial is
  recovered  the rerun finished and its digest equals the uninterrupted run's,
  corrupt    the rerun finished with a different result,
  failed     the rerun did not finish (non-zero exit),
and a kill that came after the command had already finished is not counted. Digests leave out wall-clock
fields (images/s, latency, seconds) and nothing else: shard tars and manifest bytes, final weights and the
metrics lines, sweep rows, few-shot rows.

Usage:  python scripts/faultinject.py [--kills 25] [--seed 0] [--commands shard,pretrain,sweep,fewshot] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VMOE = [sys.executable, "-m", "vmoe_cli.cli"]
TIMING = {  # what differs between otherwise identical runs
    "images_per_s", "images_per_s_min", "images_per_s_max", "repeat_ms", "latency_ms", "elapsed_s", "extract_seconds",
    "solve_seconds", "cached",
}  # fmt: skip


@dataclass
class Command:
    """One vmoe command under test: how to run it into an output folder, how to rerun it, what it produced."""

    name: str
    args: Callable[[Path], list[str]]  # the command line for an output folder
    rerun: Callable[[Path], list[str]]  # the command line that finishes a killed run
    digest: Callable[[Path], str]  # what it produced, without wall-clock fields


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_timing(value: object) -> object:
    """A JSON value with its wall-clock keys removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def json_digest(path: Path) -> str:
    return sha(json.dumps(without_timing(json.loads(path.read_text())), sort_keys=True).encode())


def shard_digest(out: Path) -> str:
    files = sorted(out.glob("*.tar")) + [out / "manifest.json"]
    return sha(b"".join(f.name.encode() + sha(f.read_bytes()).encode() for f in files))


def pretrain_digest(out: Path) -> str:
    last = (out / "checkpoints" / "last").read_text().strip()
    weights = (out / "checkpoints" / last / "model.safetensors").read_bytes()
    lines = [without_timing(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sha(weights + json.dumps(lines, sort_keys=True).encode())


def make_folder_source(root: Path, classes: int = 5, per_class: int = 400, side: int = 32) -> Path:
    """A class-folder corpus of generated PNGs (never committed): enough work for `vmoe shard` to be killed in."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def commands(work: Path) -> dict[str, Command]:
    """The commands under test; their inputs (sources, shards, a checkpoint) are prepared in `work`."""
    source, digits, trained = work / "source", work / "digits", work / "trained"
    recipe = str(ROOT / "recipes" / "digits-vmoe.yaml")
    train_sets = ["--set", f"data.shards={digits}", "--set", "train.steps=60", "--set", "train.checkpoint_every=10",
                  "--set", "train.eval_every=30", "--set", "train.log_every=10"]  # fmt: skip

    def pretrain(out: Path) -> list[str]:
        return ["pretrain", recipe, "--out", str(out), *train_sets]

    def resume(out: Path) -> list[str]:
        return pretrain(out) + (["--resume", "latest"] if (out / "checkpoints" / "last").is_file() else [])

    def shard(out: Path) -> list[str]:
        return ["shard", str(source), "--out", str(out), "--workers", "2", "--shard-size", "100", "--test", "0.2"]

    def sweep(out: Path) -> list[str]:
        grid = ["--k", "1,2", "--capacity", "0.5,1,2", "--bpr", "on,off", "--repeats", "1"]
        return ["sweep-capacity", str(digits), "--checkpoint", str(trained), "--out", str(out), *grid,
                "--cache-dir", str(out / "cache")]  # fmt: skip

    def fewshot(out: Path) -> list[str]:
        return ["fewshot", "--checkpoint", str(trained), str(digits), "--out", str(out / "fewshot.json"),
                "--cache-dir", str(out / "cache")]  # fmt: skip

    return {
        "shard": Command("shard", shard, shard, shard_digest),
        "pretrain": Command("pretrain", pretrain, resume, pretrain_digest),
        "sweep": Command("sweep", sweep, sweep, lambda out: json_digest(out / "sweep.json")),
        "fewshot": Command("fewshot", fewshot, fewshot, lambda out: json_digest(out / "fewshot.json")),
    }


def run(args: list[str]) -> int:
    return subprocess.run([*VMOE, *args], cwd=ROOT, capture_output=True).returncode


def killed(args: list[str], after_s: float) -> bool:
    """Start the command in its own process group, SIGKILL the group after `after_s`; False if it ended first."""
    process = subprocess.Popen([*VMOE, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        process.wait(timeout=after_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def prepare(work: Path, names: list[str]) -> None:
    """The inputs the commands `names` need: a generated image folder, the digits shards, a trained checkpoint."""
    if "shard" in names:
        make_folder_source(work / "source")
    steps = [["shard", "digits", "--out", str(work / "digits"), "--minival", "0.1", "--test", "0.2",
              "--shard-size", "200"]]  # fmt: skip
    if {"sweep", "fewshot"} & set(names):
        steps.append(commands(work)["pretrain"].args(work / "trained"))
    for args in steps:
        if run(args) != 0:
            raise SystemExit(f"preparing the inputs failed: vmoe {' '.join(args)}")


def inject(command: Command, work: Path, kills: int, rng: random.Random, startup_s: float) -> dict[str, int]:
    """Kill, rerun and compare `kills` times; the counts of each outcome."""
    reference = work / f"{command.name}-reference"
    start = time.perf_counter()
    if run(command.args(reference)) != 0:
        raise SystemExit(f"the uninterrupted {command.name} failed")
    duration, want = time.perf_counter() - start, command.digest(reference)
    counts = {"recovered": 0, "corrupt": 0, "failed": 0, "finished before the kill": 0}
    trial = 0
    while counts["recovered"] + counts["corrupt"] + counts["failed"] < kills:
        out, trial = work / f"{command.name}-{trial}", trial + 1
        if not killed(command.args(out), rng.uniform(min(startup_s, duration / 2), duration)):
            counts["finished before the kill"] += 1
            if counts["finished before the kill"] > 20 * kills:
                raise SystemExit(f"{command.name} finished before {20 * kills} kills in a row: no kill tested it")
            continue
        if run(command.rerun(out)) != 0:
            counts["failed"] += 1
        else:
            counts["recovered" if command.digest(out) == want else "corrupt"] += 1
    return counts | {"uninterrupted_s": round(duration, 1)}


def startup_seconds() -> float:
    """How long Python takes to import vmoe's CLI (torch is imported later, by the commands that need it): kills
    before that test nothing of vmoe's."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vmoe_cli.cli"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25, help="SIGKILLs per command")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--commands", default="shard,pretrain,sweep,fewshot")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        names = args.commands.split(",")
        prepare(work, names)
        rng, startup = random.Random(args.seed), startup_seconds()
        results = {}
        for name in names:
            results[name] = inject(commands(work)[name], work, args.kills, rng, startup)
            print(json.dumps({"command": name, **results[name]}), flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("recovered", "corrupt", "failed")}
    print(json.dumps({"kills": sum(total.values()), **total}))
    sys.exit(0 if total["corrupt"] == total["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
