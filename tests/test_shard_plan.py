"""The plan of `vmoe shard`: its order rule, shard bounds, --plan-only, memory at scale, reuse by a resumed job."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vmoe_cli.cli import main
from vmoe_cli.data.plan import build_plan
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source


def _list(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("path,label,split\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def test_the_order_is_the_seeded_permutation_of_each_listed_split(tmp_path: Path):
    """A plain-Python reference of the documented rule, on a list whose train and val rows interleave."""
    rows = [(f"d{i % 3}/img{i}.png", f"c{(i * 7) % 11}", "val" if i % 5 == 0 else "train") for i in range(503)]
    options = ShardOptions(seed=3, minival=0.1, shard_size=40, limit=300)
    plan = build_plan(open_source(str(_list(tmp_path / "list.csv", rows))), options, tmp_path / "plan")
    classes = sorted({label for _, label, _ in rows})
    listed = {split: [r for r in rows if (r[2] == "val") == (split == "test")] for split in ("train", "test")}
    order = {
        split: [items[j] for j in np.random.default_rng([3, code]).permutation(len(items))]
        for code, (split, items) in enumerate(listed.items())
    }
    held = round(0.1 * len(listed["train"]))
    expected = {"train": order["train"][held : 300 + held], "minival": order["train"][:held], "test": order["test"]}
    assert plan.classes == classes and list(plan.bounds) == ["train", "minival", "test"]
    for split, samples in expected.items():
        n = len(samples)
        assert plan.bounds[split] == [*range(0, n, 40), n]
        got = [(item.id, item.label, item.path) for item in plan.items(split, 0, n)]
        assert got == [(p, classes.index(label), tmp_path / p) for p, label, _ in samples]
        assert [item.id for item in plan.items(split, 17, 23)] == [p for p, _, _ in samples[17:23]]


def test_shard_bytes_bounds_follow_the_greedy_rule(tmp_path: Path):
    """Each shard takes samples while 1,024 + the estimated tar bytes, rounded up to a 10,240-byte record, fit."""
    sizes = np.random.default_rng(0).integers(0, 30_000, 97)
    (tmp_path / "src" / "a").mkdir(parents=True)
    for i, size in enumerate(sizes):
        (tmp_path / "src" / "a" / f"{i:03d}.jpg").write_bytes(bytes(int(size)))  # sizes, not images: nothing is read
    options = ShardOptions(shard_bytes=100_000, shard_size=9)
    plan = build_plan(open_source(str(tmp_path / "src")), options, tmp_path / "plan")
    order = [int(item.id[2:5]) for item in plan.items("train", 0, 97)]
    bounds, start = [0], 0
    while start < 97:  # the loop the plan replaces, on the same order
        end, size = start, 1024
        while end < 97 and end - start < 9:
            size += 5 * 512 + -(-int(sizes[order[end]]) // 512) * 512
            if end > start and -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > 100_000:
                break
            end += 1
        bounds.append(start := end)
    assert plan.bounds["train"] == bounds and len(bounds) > 15


def test_plan_only_reads_no_image_and_the_next_run_starts_from_the_plan(tmp_path: Path):
    rows = [(f"n{i % 100:03d}/{i}.jpg", f"n{i % 100:03d}", "val" if i % 50 == 0 else "") for i in range(20_000)]
    listing, out = _list(tmp_path / "list.csv", rows), tmp_path / "out"  # the images do not exist
    args = ["shard", str(listing), "--out", str(out), "--plan-only", "--minival", "0.01", "--shard-size", "1000"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line[:1] == "│"]
    assert cells == [["train", "19,404", "20", "-"], ["minival", "196", "1", "-"], ["test", "400", "1", "-"]]
    assert "100 classes" in result.stdout and f"plan kept in {out / '.vmoe-shard'}" in result.stdout
    assert not list(out.glob("*.tar")) and not (out / "skipped.jsonl").exists()

    options = ShardOptions(minival=0.01, shard_size=1000)
    calls = []
    write_shards(open_source(str(listing)), out, options, plan_only=True, progress=lambda *c: calls.append(c[0]))
    assert calls == []  # neither listed nor planned again
    with listing.open("a") as f:
        f.write("n000/extra.jpg,n000,train\n")
    manifest = write_shards(
        open_source(str(listing)), out, options, plan_only=True, progress=lambda *c: calls.append(c[0])
    )
    assert calls[0] == "listing" and manifest["splits"]["train"]["count"] == 19_405  # a changed list: listed again


PLAN_RUN = """
import re, sys
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
write_shards(open_source(sys.argv[1]), sys.argv[2], ShardOptions(minival=0.01), plan_only=True)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])  # this process's peak, since exec
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc")
def test_planning_200k_rows_takes_a_few_bytes_per_row(tmp_path: Path):
    """Peak memory of planning 200,000 rows over that of 1,000 rows, each in a fresh process (the rows' Python
    objects alone would take over 200 MB)."""
    peaks = []
    for rows in (1000, 200_000):
        listing = tmp_path / f"list-{rows}.csv"
        listing.write_text("path,label\n" + "".join(f"c{i % 997}/img_{i:07d}.JPEG,c{i % 997}\n" for i in range(rows)))
        run = [sys.executable, "-c", PLAN_RUN, str(listing), str(tmp_path / f"out-{rows}")]
        peaks.append(int(subprocess.run(run, capture_output=True, text=True, check=True).stdout) / 1024)
    assert peaks[1] - peaks[0] < 40, f"{peaks[1] - peaks[0]:.0f} MiB more for 199,000 more rows"
    plan = json.loads((tmp_path / "out-200000" / ".vmoe-shard" / "plan" / "plan.json").read_text())
    assert plan["rows"] == 200_000 and len(plan["classes"]) == 997


def test_the_shard_command_never_imports_torch(tmp_path: Path):
    """Sharding needs no torch: `vmoe shard` and its spawned workers start without it (about 200 MiB and a second
    or two less each)."""
    listing = _list(tmp_path / "list.csv", [(f"c{i % 3}/{i}.jpg", f"c{i % 3}", "") for i in range(300)])
    run = [
        sys.executable, "-c", "import sys; from vmoe_cli.cli import main; main(standalone_mode=False); "
        "print('torch' in sys.modules)", "shard", str(listing), "--out", str(tmp_path / "out"), "--plan-only",
    ]  # fmt: skip
    finished = subprocess.run(run, capture_output=True, text=True, check=True)
    assert finished.stdout.splitlines()[-1] == "False", finished.stdout
