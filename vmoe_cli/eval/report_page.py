"""`vmoe report`: one self-contained HTML page per run, to read the run at a glance and to share it.

The page holds the recipe and model card, the curves of metrics.jsonl, the routing analysis (RUN/routing/
summary.json and its figures, as `vmoe routing` writes them), capacity sweeps and few-shot results found in
the run directory or given, and the paths of the artefacts. Figures are PNG data URIs and the CSS is inline:
no script, no request, no file beside it, and a Content-Security-Policy that forbids anything else.

Everything read is untrusted: text is HTML-escaped, images are embedded only when Pillow reads them as PNG
and they lie inside their folder, JSON is only parsed, and what cannot be read becomes a note on the page.
This module reads other evaluators' output files; it imports none of them.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmoe_cli import __version__
from vmoe_cli.atomic import write_text_atomic
from vmoe_cli.checkpoint import CONFIG, METRICS, STEP_NAME, checkpoint_dir
from vmoe_cli.config import Recipe, load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.curves import curve_figures, read_metrics
from vmoe_cli.eval.plots import pyplot

REPORT = "report.html"
ROUTING = "routing"  # `vmoe routing --out` default inside a run: summary.json + the figures it lists
SWEEP = "sweep.json"
MAX_JSON = 20_000_000  # bytes of a results file read
MAX_PNG = 20_000_000
MAX_LISTED = 100  # files of one folder listed
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1b1b1b; max-width: 1280px; margin: 0 auto;
       padding: .5rem 1.5rem 3rem; }
h1 { font-size: 1.55rem; margin: .8rem 0 .2rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; border-bottom: 2px solid #ddd; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
p.lead { margin: .2rem 0 1rem; color: #444; }
nav { margin: 1rem 0; }
nav a { margin-right: 1.2rem; }
table { border-collapse: collapse; font-size: .88rem; margin: .3rem 0; }
th, td { padding: .2rem .7rem; text-align: left; border-bottom: 1px solid #e4e4e4; vertical-align: top; }
th { background: #f3f3f3; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.mark td { background: #fff1c2; font-weight: 600; }
pre { background: #f6f6f6; border: 1px solid #e4e4e4; padding: .6rem; overflow: auto; max-height: 32rem;
      font-size: .8rem; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(26rem, 1fr)); gap: 0 2rem; }
figure { margin: .8rem 0 1.6rem; }
img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { font-size: .85rem; color: #444; max-width: 60rem; }
.notes { background: #fdf0ee; border-left: 4px solid #b03a2e; padding: .3rem 1rem; margin: 1rem 0; }
footer { margin-top: 3rem; font-size: .8rem; color: #666; }
"""


@dataclass
class Report:
    """What `write_report` wrote: the page, how many figures it embeds, and the notes it carries."""

    path: Path
    figures: int = 0
    notes: list[str] = field(default_factory=list)
    artefacts: list[tuple[str, Path]] = field(default_factory=list)  # (what, path) listed at the end


def write_report(
    run_dir: str | Path, out: str | Path | None = None, sweeps: Sequence[str | Path] = (),
    fewshots: Sequence[str | Path] = (),
) -> Report:  # fmt: skip
    """Write the report page of `run_dir` to `out` (default RUN/report.html) atomically.

    `sweeps` are `vmoe sweep-capacity --out` folders (or their sweep.json) and `fewshots` `vmoe fewshot --out`
    files, added to those found in the run directory. A missing or unreadable part of the run is a note on
    the page; a missing given file, or a folder that is no run, is a VmoeError.
    """
    run = _run_dir(Path(run_dir))
    pyplot()  # without matplotlib: one line before any work
    report = Report(Path(out) if out is not None else run / REPORT)
    found_sweeps, found_fewshots = _results_in(run, report)
    given_sweeps = [(p, _given(p, "--sweep", _is_sweep)) for p in map(_sweep_file, sweeps)]
    given_fewshots = [(Path(p), _given(Path(p), "--fewshot", _is_fewshot)) for p in fewshots]
    report.artefacts.append(("run directory", run))
    recipe_text, recipe = _recipe(run, report)
    records, notes = read_metrics(run / METRICS)
    report.notes += notes
    report.artefacts.append(("metrics", run / METRICS))
    sections = {
        "model": ("Recipe and model", _model_section(recipe_text, recipe, report)),
        "curves": ("Training curves", _curves_section(records, report)),
        "routing": ("Routing analysis", _routing_section(run / ROUTING, report)),
        "sweep": ("Capacity sweep", _sweep_section(_unique([*given_sweeps, *found_sweeps]), report)),
        "fewshot": ("Few-shot", _fewshot_section(_unique([*given_fewshots, *found_fewshots]), report)),
    }
    _stored_artefacts(run, report)
    report.artefacts.append(("this report", report.path))
    sections["artefacts"] = ("Artefacts", _artefacts_section(report.artefacts))
    page = _page(run, recipe, records, {k: v for k, v in sections.items() if v[1]}, report.notes)
    report.path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report.path, page)
    return report


def _run_dir(run: Path) -> Path:
    if not run.is_dir():
        raise VmoeError(f"{run}: no such run directory (give the --out folder of vmoe pretrain or finetune)")
    if not any((run / name).exists() for name in (CONFIG, METRICS, "checkpoints")):
        raise VmoeError(f"{run}: not a run directory (no {CONFIG}, {METRICS} or checkpoints/)")
    return run


# ------------------------------------------------------------------------------------------------ reading files


def _read_json(path: Path, report: Report | None) -> Any:
    """A JSON file's value, or None with a note (on `report`) when it cannot be read."""
    try:
        if path.stat().st_size > MAX_JSON:
            raise ValueError(f"larger than {MAX_JSON:,} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if report is not None:
            report.notes.append(f"{path}: not readable JSON ({e})")
        return None


def _is_sweep(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("rows"), list) and "trained" in data


def _is_fewshot(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("datasets"), dict) and "shots" in data


def _sweep_file(path: str | Path) -> Path:
    path = Path(path)
    return path / SWEEP if path.is_dir() else path


def _given(path: Path, option: str, kind: Any) -> Any:
    """The results in a file named on the command line; a VmoeError when they are not there."""
    what = "sweep.json of vmoe sweep-capacity --out" if option == "--sweep" else "JSON file of vmoe fewshot --out"
    if not path.is_file():
        raise VmoeError(f"{option} {path}: no such file; give the {what}")
    data = _read_json(path, None)
    if not kind(data):
        raise VmoeError(f"{option} {path}: not the {what}")
    return data


def _results_in(run: Path, report: Report) -> tuple[list[tuple[Path, Any]], list[tuple[Path, Any]]]:
    """Sweeps and few-shot results among the JSON files of the run directory and its folders one level down."""
    skip = {"checkpoints", ROUTING, "tensorboard"}
    files = [p for p in sorted(run.glob("*.json")) + sorted(run.glob("*/*.json")) if p.parent.name not in skip]
    sweeps, fewshots = [], []
    for path in files[:MAX_LISTED]:
        if path.is_symlink() or not path.is_file():
            continue
        data = _read_json(path, report)
        if _is_sweep(data):
            sweeps.append((path, data))
        elif _is_fewshot(data):
            fewshots.append((path, data))
    return sweeps, fewshots


def _unique(found: Iterable[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Each file once (given on the command line and also found in the run)."""
    seen, out = set(), []
    for path, data in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((path, data))
    return out


def _recipe(run: Path, report: Report) -> tuple[str | None, Recipe | None]:
    """The text of RUN/config.yaml (else of the newest checkpoint's) and the recipe built from it, or notes."""
    path = run / CONFIG
    if not path.is_file():
        newest = _checkpoint_dirs(run)[-1:]
        path = newest[0] / CONFIG if newest else path
    if not path.is_file():
        report.notes.append(f"{CONFIG}: not found in the run or its checkpoints, so no recipe and model card")
        return None, None
    report.artefacts.append(("recipe", path))
    try:
        text = path.read_bytes()[:MAX_JSON].decode("utf-8", "replace")
        return text, load_recipe(path)
    except VmoeError as e:
        report.notes.append(f"model card left out: {e}")
        return text, None
    except OSError as e:
        report.notes.append(f"{path}: cannot be read ({e.strerror})")
        return None, None


def _checkpoint_dirs(run: Path) -> list[Path]:
    """The run's step_XXXXXXXX checkpoint folders, oldest first (symlinks left out)."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.name)


def _png(folder: Path, name: Any, report: Report) -> bytes | None:
    """The bytes of PNG file `name` directly inside `folder`, when Pillow reads them; None with a note otherwise."""
    if not isinstance(name, str) or not name or name.startswith(".") or Path(name).name != name or "\0" in name:
        report.notes.append(f"{folder}: figure {name!r} is not a file name in that folder; left out")
        return None
    path = folder / name
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_PNG:
            raise ValueError(f"not a regular file under {MAX_PNG:,} bytes")
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError("not a PNG file")
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"{image.format} inside")
            image.verify()
    except Exception as e:  # noqa: BLE001 - an untrusted image may fail to decode in any way; it is left out
        report.notes.append(f"{path}: left out ({e})")
        return None
    return data


# ---------------------------------------------------------------------------------------------------- sections


def _model_section(recipe_text: str | None, recipe: Recipe | None, report: Report) -> str:
    parts = []
    if recipe is not None:
        from vmoe_cli.eval.flops import model_card

        rows = [[html.escape(label), _num(value)] for label, value in model_card(recipe.model).items()]
        parts.append("<div><h3>Model card</h3>" + _table(["property", "value"], rows, right=[1]) + "</div>")
    if recipe_text is not None:
        parts.append(f"<div><h3>Recipe ({CONFIG})</h3><pre>{html.escape(recipe_text)}</pre></div>")
    return f'<div class="cols">{"".join(parts)}</div>' if parts else ""


def _curves_section(records: list[dict[str, Any]], report: Report) -> str:
    if not records:
        return "<p>No metrics logged yet.</p>"
    figures, notes = curve_figures(records)
    report.notes += notes
    return "".join(_figure(f.png, f.title, f.caption, report) for f in figures)


def _routing_section(folder: Path, report: Report) -> str:
    """The figures RUN/routing/summary.json lists, in order, with their titles and captions."""
    summary = folder / "summary.json"
    if not folder.is_dir():
        return ""
    data = _read_json(summary, report) if summary.is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
        report.notes.append(f"{folder}: no summary.json listing figures (rerun vmoe routing)")
        return ""
    parts = []
    facts = [[html.escape(str(k)[:100]), _num(v)[:300]] for k, v in data.items() if isinstance(v, str | int | float)]
    if facts:
        parts.append(_table(None, facts[:MAX_LISTED]))
    for item in data["figures"][:MAX_LISTED]:
        item = item if isinstance(item, dict) else {}
        png = _png(folder, item.get("file"), report)
        if png is not None:
            parts.append(_figure(png, str(item.get("title", "")), str(item.get("caption", "")), report))
    return "".join(parts)


def _sweep_section(sweeps: list[tuple[Path, Any]], report: Report) -> str:
    parts = []
    for path, data in sweeps:
        try:
            table = _sweep_table(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.notes.append(f"{path}: not in the format of vmoe sweep-capacity ({type(e).__name__}: {e})")
            continue
        report.artefacts += [("sweep", p) for p in (path, *_beside(path, ("sweep.csv", "sweep.png")))]
        title = f"{data.get('checkpoint', '?')} on {data.get('data', '?')} ({data.get('split', '?')} split)"
        parts.append(f"<h3>{html.escape(title)}</h3>")
        if (path.parent / "sweep.png").is_file():
            figure = _png(path.parent, "sweep.png", report)
            if figure is not None:
                parts.append(_figure(figure, "", "The sweep's figure, as vmoe sweep-capacity drew it.", report))
        parts.append(table)
    return "".join(parts)


def _sweep_table(data: dict[str, Any]) -> str:
    """One row per setting, the trained setting highlighted, the dense twin last."""
    trained = data["trained"]
    header = ["K", "BPR", "capacity factor", "top-1 %", "dropped by all %", "dropped by any %", "GFLOPs", "images/s"]
    rows, marks = [], []
    for r in data["rows"]:
        setting = (r["k"], r["capacity_factor"], r["bpr"])
        marks.append(setting == (trained["k"], trained["capacity_factor"], trained["bpr"]))
        rows.append([_num(r["k"]), "on" if r["bpr"] else "off", _num(r["capacity_factor"]), _pct(r["top1"]),
                     _pct(r["dropped_all"]), _pct(r["dropped_any"]), _num(r["gflops"]),
                     _rate(r["images_per_s"])])  # fmt: skip
    base = data.get("baseline")
    if isinstance(base, dict):
        rows.append(
            ["dense twin", "", "", _pct(base["top1"]), "", "", _num(base["gflops"]), _rate(base["images_per_s"])]
        )
        marks.append(False)
    caption = (f"Trained with K={trained['k']}, capacity factor {trained['capacity_factor']}, BPR "
               f"{'on' if trained['bpr'] else 'off'} (highlighted).")  # fmt: skip
    return f"<p>{html.escape(caption)}</p>" + _table(header, rows, right=[0, 2, 3, 4, 5, 6, 7], marks=marks)


def _fewshot_section(results: list[tuple[Path, Any]], report: Report) -> str:
    """One table: a row per results file and dataset, mean ± std over seeds per shot count."""
    shots = sorted({s for _, data in results for s in _list(data["shots"]) if _is_number(s)})
    rows = []
    for path, data in results:
        try:
            for name, info in data["datasets"].items():
                cells = [_mean_std(info["summary"], s) for s in shots]
                rows.append([html.escape(str(data.get("checkpoint", path.stem))), html.escape(str(name)), *cells])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.notes.append(f"{path}: not in the format of vmoe fewshot ({type(e).__name__}: {e})")
            continue
        report.artefacts += [("few-shot", p) for p in (path, *_beside(path, (path.stem + ".csv",)))]
    if not rows:
        return ""
    probe = {str(data.get("probe", "?")) for _, data in results}
    text = f"Linear {', '.join(sorted(probe))} probe on frozen features: top-1 % on the test split, mean ± std."
    return f"<p>{html.escape(text)}</p>" + _table(
        ["backbone", "data", *(f"{_num(s)}-shot" for s in shots)], rows, right=range(2, 2 + len(shots))
    )


def _stored_artefacts(run: Path, report: Report) -> None:
    """The checkpoints (the one checkpoints/last names marked), TensorBoard events and the routing analysis."""
    last_file = checkpoint_dir(run) / "last"
    try:
        last = last_file.read_bytes()[:64].decode("utf-8", "replace").strip() if last_file.is_file() else ""
    except OSError:
        last = ""
    for path in _checkpoint_dirs(run)[-MAX_LISTED:]:
        report.artefacts.append((f"checkpoint{' (last)' if path.name == last else ''}", path))
    if (run / "tensorboard").is_dir():
        report.artefacts.append(("TensorBoard events", run / "tensorboard"))
    routing = run / ROUTING
    if routing.is_dir():
        files = sorted(p for p in routing.iterdir() if p.is_file() and not p.name.startswith("."))
        report.artefacts += [("routing analysis", p) for p in files[:MAX_LISTED]]


def _artefacts_section(artefacts: list[tuple[str, Path]]) -> str:
    rows = []
    for what, path in artefacts:
        if path.exists() or what == "this report":
            size = "" if what in ("run directory", "this report") else _size(path)
            rows.append([html.escape(what), f"<code>{html.escape(os.path.abspath(path))}</code>", size])
    return _table(["what", "path", "size"], rows, right=[2])


def _beside(path: Path, names: Sequence[str]) -> list[Path]:
    return [path.parent / n for n in names if (path.parent / n).is_file()]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# ---------------------------------------------------------------------------------------------------- the page


def _page(run: Path, recipe: Recipe | None, records: list[dict], sections: dict[str, tuple[str, str]],
          notes: list[str]) -> str:  # fmt: skip
    """The whole document: head (CSP, inline CSS), title, glance table, notes, navigation, sections, footer."""
    title = f"vmoe run {run.resolve().name}"
    nav = " ".join(f'<a href="#{key}">{html.escape(heading)}</a>' for key, (heading, _) in sections.items())
    body = [f"<h1>{html.escape(title)}</h1>"]
    if recipe is not None and recipe.description:
        body.append(f'<p class="lead">{html.escape(recipe.description)}</p>')
    body.append(_table(None, _glance(recipe, records)))
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        body.append(f'<div class="notes"><p>Notes: parts of the run that could not be shown</p><ul>{items}</ul></div>')
    body.append(f"<nav>{nav}</nav>")
    body += [
        f'<section id="{key}"><h2>{html.escape(h)}</h2>{content}</section>' for key, (h, content) in sections.items()
    ]
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f"<footer>Written by vmoe {__version__} report on {written}. One file: figures embedded, "
                "no scripts, nothing fetched.</footer>")  # fmt: skip
    head = (f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style>")  # fmt: skip
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>{head}</head>\n<body>\n' + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _glance(recipe: Recipe | None, records: list[dict[str, Any]]) -> list[list[str]]:
    """The run in a few lines: model, steps, final evaluation and loss, speed."""
    rows = []
    if recipe is not None:
        moe = recipe.model.moe
        routing = "dense" if moe is None else f"{moe.router} router, {moe.num_experts} experts"
        routing += f", K={moe.k}" if moe is not None and moe.kind.choice == "token" else ""
        rows.append(["model", html.escape(f"{recipe.model.variant}, {routing}")])
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if _is_number(r.get("eval_top1"))]
    if train:
        planned = f" of {recipe.train.steps}" if recipe is not None and recipe.train and recipe.train.steps else ""
        rows.append(["steps logged", html.escape(f"{_num(train[-1]['step'])}{planned}")])
        rows.append(["final task loss", _num(train[-1]["loss"])])
    if evals:
        last = evals[-1]
        split = f" on {recipe.data.eval_split}" if recipe is not None and recipe.data else ""
        counts = f" ({_num(last.get('eval_correct'))}/{_num(last.get('eval_total'))})" if "eval_total" in last else ""
        text = f"{100 * last['eval_top1']:.2f}%{split}{counts} at step {_num(last['step'])}"
        rows.append(["final evaluation top-1", html.escape(text)])
    speeds = [r["images_per_s"] for r in train if _is_number(r.get("images_per_s"))]
    if speeds:
        rows.append(["training speed (median)", f"{_rate(statistics.median(speeds))} images/s"])
    return rows or [["metrics", "none logged"]]


def _figure(png: bytes, title: str, caption: str, report: Report) -> str:
    """An embedded PNG with its heading and caption; its size from the PNG header, so the page lays out at once."""
    report.figures += 1
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    alt = html.escape(title or caption or "figure")
    return f'<figure>{heading}<img alt="{alt}" src="{src}" width="{width}" height="{height}">{text}</figure>'


def _table(header: Sequence[str] | None, rows: list[list[str]], right: Iterable[int] = (),
           marks: Sequence[bool] = ()) -> str:  # fmt: skip
    """A table of cells that are HTML already (escaped by the caller); columns `right` right-aligned, rows whose
    `marks` is true highlighted."""
    right = set(right)
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    lines = []
    for i, row in enumerate(rows):
        mark = ' class="mark"' if i < len(marks) and marks[i] else ""
        cells = "".join(f'<td class="n">{c}</td>' if j in right else f"<td>{c}</td>" for j, c in enumerate(row))
        lines.append(f"<tr{mark}>{cells}</tr>")
    return f"<table>{head}{''.join(lines)}</table>"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any) -> str:
    """A value as escaped text: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return html.escape(str(value))


def _pct(value: Any) -> str:
    """A fraction as a percentage with 2 decimals; empty when it is not a number."""
    return f"{100 * value:.2f}" if _is_number(value) else ""


def _rate(value: Any) -> str:
    """Images/s as a whole number; empty when it is not a number."""
    return f"{value:,.0f}" if _is_number(value) else ""


def _mean_std(summary: dict[str, Any], shots: int) -> str:
    """'mean ± std' in % of one shot count (JSON keys are strings); empty when that count was not run."""
    cell = summary.get(str(shots), summary.get(shots)) if isinstance(summary, dict) else None
    if not isinstance(cell, dict) or not _is_number(cell.get("mean")):
        return ""
    std = f" ± {100 * cell['std']:.1f}" if _is_number(cell.get("std")) else ""
    return f"{100 * cell['mean']:.1f}{std}"


def _size(path: Path) -> str:
    """A file's size, or a folder's (its files, one level down), in kB or MB."""
    try:
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.is_symlink())
        else:
            size = path.stat().st_size
    except OSError:
        return ""
    return f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"
