"""vmoe report: the page of a real tiny run, in headless Chromium when one is installed, and of hostile,
broken and empty runs."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pages import EMBEDDED_IMAGE, find_chromium, outside_references, visit
from PIL import Image

from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.eval.report_page import write_report
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
ROUTING_FIGURES = [("loads.png", "Expert load per layer", (200, 120)), ("maps.png", "Patch maps", (160, 90))]


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> Path:
    """A real tiny digits V-MoE run (8 steps, logged every 2, evaluated and saved every 4), with a routing folder
    as `vmoe routing` leaves it: summary.json listing two PNGs in order."""
    out = tmp_path_factory.mktemp("report") / "run"
    settings = {"steps": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 2}
    pretrain(load_recipe(ROOT / "recipes" / "digits-vmoe.yaml",
                         [f"data.shards={digits}", *(f"train.{k}={v}" for k, v in settings.items())]), out)  # fmt: skip
    routing = out / "routing"
    routing.mkdir()
    for i, (name, _, size) in enumerate(ROUTING_FIGURES):
        Image.new("RGB", size, (40 * i, 120, 200)).save(routing / name)
    figures = [{"file": name, "title": title, "caption": f"caption of {title}"} for name, title, _ in ROUTING_FIGURES]
    (routing / "summary.json").write_text(json.dumps({"figures": figures, "split": "test", "images": 359}))
    return out


def test_the_page_of_a_real_run_loads_in_chromium(run, tmp_path):
    if find_chromium() is None:
        pytest.skip("no Chromium: neither /usr/bin/chromium nor chromium on PATH (apt-get install chromium)")
    done = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "report.html")])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "(5 figures, 0 notes)" in done.output  # 3 curve groups + 2 routing figures
    seen = visit(tmp_path / "report.html")
    assert seen.images == 5 and seen.images_loaded
    assert seen.errors == []
    assert {url.split(",")[0] for url in seen.requests} == {(tmp_path / "report.html").as_uri(), EMBEDDED_IMAGE[:-1]}
    with Image.open(io.BytesIO(seen.screenshot)) as shot:
        assert shot.width == 1280 and shot.height > 2000  # the whole page
        low, high = shot.convert("L").getextrema()
        assert high - low > 100  # not a blank page


def test_the_page_embeds_everything_it_shows(run):
    done = write_report(run)
    page = (run / "report.html").read_text()
    assert done.path == run / "report.html" and done.notes == []
    assert outside_references(page) == []
    assert page.count(f'src="{EMBEDDED_IMAGE}') == done.figures == 5
    titles = [page.index(title) for _, title, _ in ROUTING_FIGURES]
    assert titles == sorted(titles) and "caption of Patch maps" in page  # in summary.json's order
    for part in ("Model card", "total parameters", "Recipe (config.yaml)", "MoE blocks", "Training curves",
                 "Routing over training", "Auxiliary losses", "checkpoint (last)", "step_00000008"):  # fmt: skip
        assert part in page, part


def test_hostile_text_is_escaped_and_nothing_escapes_its_folder(run, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(run, hostile, ignore=shutil.ignore_patterns("checkpoints", "report.html"))
    config = yaml.safe_load((hostile / "config.yaml").read_text())
    config["description"] = HOSTILE
    (hostile / "config.yaml").write_text(yaml.safe_dump(config))
    with (hostile / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 13, HOSTILE: 1.0, f"moe1/{HOSTILE}$x$": 2.0}) + "\n")
    Image.new("RGB", (10, 10)).save(tmp_path / "outside.png")
    summary = {"figures": [{"file": "../outside.png", "title": HOSTILE}, {"file": "loads.png", "title": HOSTILE,
               "caption": HOSTILE}], HOSTILE: HOSTILE}  # fmt: skip
    (hostile / "routing" / "summary.json").write_text(json.dumps(summary))
    (hostile / "routing" / "maps.png").write_text("not a png")
    done = write_report(hostile)
    page = done.path.read_text()
    assert "<script" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in page
    assert outside_references(page) == []
    assert done.figures == 4  # 3 curve groups + loads.png; ../outside.png is refused
    assert any("'../outside.png' is not a file name in that folder" in note for note in done.notes)
    if find_chromium() is not None:
        seen = visit(done.path)
        assert seen.images == 4 and seen.images_loaded and seen.errors == []


def test_a_run_without_metrics_still_gives_a_page_and_bad_lines_are_noted(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty)
    done = write_report(empty)
    page = done.path.read_text()
    assert done.figures == 0 and "No metrics logged yet" in page and "Model card" in page
    assert any("metrics.jsonl: not found" in note for note in done.notes)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    lines[1:1] = [b'{"step": 4, "loss": 1.0', b"[1, 2]", b'{"loss": 3}', b"\xff\xfe"]  # cut, no object, no step, bytes
    (damaged / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    done = write_report(damaged)
    assert done.figures == 3 and "Model card" not in done.path.read_text()
    assert [n for n in done.notes if "metrics.jsonl: 4 line(s) left out" in n and "(line 2, 3, 4, 5)" in n]
    assert any("config.yaml: not found" in note for note in done.notes)


def test_mistakes_are_one_line(run, tmp_path):
    runner = CliRunner()
    not_a_run = runner.invoke(main, ["report", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "not a run directory (no config.yaml" in not_a_run.output
    no_sweep = runner.invoke(main, ["report", str(run), "--sweep", str(tmp_path)])
    assert no_sweep.exit_code == 2 and f"--sweep {tmp_path / 'sweep.json'}: no such file" in no_sweep.output
    on_folder = runner.invoke(main, ["report", str(run), "--out", str(tmp_path)])
    assert on_folder.exit_code == 2 and f"--out {tmp_path}: is a folder; give a file name" in on_folder.output
    (tmp_path / "other.json").write_text('{"rows": 3}')
    wrong = runner.invoke(main, ["report", str(run), "--fewshot", str(tmp_path / "other.json")])
    assert wrong.exit_code == 2 and "not the JSON file of vmoe fewshot --out" in wrong.output


def test_without_matplotlib_the_report_is_one_line(run, tmp_path):
    code = "import sys; sys.modules['matplotlib'] = None; from vmoe_cli.cli import main; main()"
    args = [sys.executable, "-c", code, "report", str(run), "--out", str(tmp_path / "r.html")]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: figures need matplotlib: pip install 'vmoe[plot]'"
    assert not (tmp_path / "r.html").exists()
