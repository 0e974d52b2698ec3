"""quickstart: the whole pipeline on digits end to end (shortened runs), and a rerun that redoes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from pages import EMBEDDED_IMAGE, find_chromium, outside_references, visit

from vmoe_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_step_and_a_rerun_resumes(tmp_path):
    args = ["quickstart", "--out", str(tmp_path / "runs"), "--shards", str(tmp_path / "digits")]
    args += ["--recipes", str(ROOT / "recipes"), "--cache-dir", str(tmp_path / "cache")]
    args += ["--set", "train.steps=20", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "[4/5] capacity sweep" in first.output and "sweep plot" in first.output
    sweep = json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())
    assert len(sweep["rows"]) == 32 and sweep["baseline"] is not None
    manifest = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 1258, "minival": 180, "test": 359}
    for name in ("pixels", "digits-vmoe", "digits-vit"):
        assert set(json.loads((tmp_path / "runs" / "fewshot" / f"{name}.json").read_text())["shots"]) == {1, 5, 10, 25}
    assert (tmp_path / "runs" / "sweep" / "sweep.png").stat().st_size > 10_000
    report = tmp_path / "runs" / "digits-vmoe" / "report.html"
    assert first.output.splitlines()[-1].strip() == str(report)  # the report page's path comes last
    check_report(report)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("(already trained)") == 2 and "cached" in again.output
    assert json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())["rows"] == sweep["rows"]


def check_report(report: Path) -> None:
    """The V-MoE's page embeds everything it shows: 3 curve groups and the sweep's figure, the sweep table with
    the dense twin, the three few-shot probes; and it loads in Chromium without an error when one is here."""
    page = report.read_text()
    assert outside_references(page) == []
    assert page.count(f'src="{EMBEDDED_IMAGE}') == 4
    assert "dense twin" in page and "Capacity sweep" in page and "25-shot" in page
    assert all(f"{name}</td>" in page for name in ("<td>pixels", "/digits-vmoe", "/digits-vit"))
    if find_chromium() is not None:
        seen = visit(report)
        assert seen.images == 4 and seen.images_loaded and seen.errors == []
