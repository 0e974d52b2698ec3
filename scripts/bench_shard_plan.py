"""Benchmark listing and planning at scale: `vmoe shard LIST --plan-only` on a synthetic list file.

Writes a CSV list of N rows shaped like ImageNet-21k (`train/nXXXXXXXX/nXXXXXXXX_I.JPEG,nXXXXXXXX`, 21,843 classes;
the files need not exist: planning opens none), runs the real command in a child process, and reports its CPU time
per row and its peak resident memory. A run on a 1,000-row list, measured the same way, is the baseline: CPU per row
is (CPU(N) - CPU(1,000)) / (N - 1,000), and the memory of 14 million rows is extrapolated linearly from the two. A
second run of the same command on the same --out measures the resumed job, which reads the saved plan instead of
listing again. Planning is a single process (no worker is started), so its peak is that of all processes.
Memory grows with the rows only from the last chunk of rows parsed on (a fixed 16,384 rows), so the 14-million
figure is extrapolated from the two largest runs.

With --library the child calls `write_shards(..., plan_only=True)` instead of the command, leaving out the
command's own start-up (click, rich and the command table).

Usage:  python scripts/bench_shard_plan.py --rows 1000000 [--rows 5000000] [--classes 21843] [--minival 0.01]
                                           [--library]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BASE_ROWS = 1000
TARGET_ROWS = 14_000_000


def write_list(path: Path, rows: int, classes: int) -> None:
    """A CSV list of `rows` synthetic image paths with their class (wnid-like) labels, written in blocks."""
    with open(path, "w") as f:
        f.write("path,label\n")
        for start in range(0, rows, 100_000):
            f.write(
                "".join(
                    f"train/n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG,n{i % classes:08d}\n"
                    for i in range(start, min(rows, start + 100_000))
                )
            )


COMMAND = "import sys; from vmoe_cli.cli import main; main(sys.argv[1:])"
LIBRARY = """import sys
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
write_shards(open_source(sys.argv[2]), sys.argv[4], ShardOptions(minival=float(sys.argv[7])), plan_only=True)
"""


def run(code: str, args: list[str]) -> tuple[float, float]:
    """CPU seconds (user + system) and peak resident MiB of `code` run with ARGS as a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vmoe {' '.join(args)} failed:\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_maxrss / 1024  # Linux: KiB; the largest child so far (see main: smallest run first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="rows of a list to plan (repeatable)")
    parser.add_argument("--classes", type=int, default=21843, help="distinct labels")
    parser.add_argument("--minival", default="0.01", help="the --minival of the planned job")
    parser.add_argument("--library", action="store_true", help="call write_shards, not the vmoe command")
    args = parser.parse_args()
    code = LIBRARY if args.library else COMMAND
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for rows in [BASE_ROWS, *sorted(args.rows or [1_000_000])]:
            listing = Path(tmp) / f"list-{rows}.csv"
            write_list(listing, rows, args.classes)
            out = Path(tmp) / f"out-{rows}"
            command = ["shard", str(listing), "--out", str(out), "--plan-only", "--minival", args.minival]
            cpu, peak = run(code, command)
            resumed_cpu, _ = run(code, command)
            results[rows] = (cpu, peak, resumed_cpu)
            listing.unlink()
        base_cpu, base_peak, _ = results[BASE_ROWS]
        print(f"{'rows':>11} {'CPU s':>7} {'CPU us/row':>11} {'peak MiB':>9} {'bytes/row':>10} {'resumed CPU s':>14}")
        for rows, (cpu, peak, resumed) in results.items():
            per_row = (cpu - base_cpu) / (rows - BASE_ROWS) * 1e6 if rows > BASE_ROWS else float("nan")
            per_byte = (peak - base_peak) * 2**20 / (rows - BASE_ROWS) if rows > BASE_ROWS else float("nan")
            print(f"{rows:>11,} {cpu:>7.1f} {per_row:>11.2f} {peak:>9.0f} {per_byte:>10.1f} {resumed:>14.1f}")
        low, high = sorted(results)[-2:]
        slope = (results[high][1] - results[low][1]) / (high - low)
        peak = results[high][1] + slope * (TARGET_ROWS - high)
        print(f"peak at {TARGET_ROWS:,} rows, extrapolated from {low:,} and {high:,} rows: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
