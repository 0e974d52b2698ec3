"""Figures: what every figure shares (matplotlib on Agg, styles readable in grey, atomic PNG writes), and the
capacity sweep's figure. The routing analysis's figures are in eval/routing_plots.py.

Every figure must read in grey as well as in colour: curves differ by line style and marker as well as by
colour, bars by hatching, and maps use viridis or cividis, whose lightness changes monotonically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vmoe_cli.atomic import write_bytes_atomic
from vmoe_cli.errors import VmoeError

COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00")  # Okabe-Ito: safe for colour blindness
MARKERS = ("o", "s", "^", "D", "v", "P")
HATCHES = ("", "//", "xx", "..", "\\\\", "++", "oo", "--")
DPI = 100


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed); a one-line VmoeError when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VmoeError("figures need matplotlib: pip install 'vmoe[plot]'") from None
    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """`fig` as a PNG at `path`, written atomically, and closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def plot_sweep(results: dict[str, Any], out: str | Path) -> Path:
    """Draw `results` (from eval.sweep.sweep) as one PNG: `sweep_figure`."""
    return save_figure(sweep_figure(results), out)


def sweep_figure(results: dict[str, Any]) -> Any:
    """Four panels: top-1 vs GFLOPs, measured images/s (median and range over repeats) vs capacity factor, and
    tokens dropped by all and by any of their choices vs capacity factor.

    One curve per (K, BPR): K sets colour and marker, BPR the line (solid, filled markers) against vanilla
    (dashed, larger open markers, drawn on top so that both show where they coincide). The trained setting is ringed
    and its capacity factor a dotted vertical line; the dense twin is a star and a dotted horizontal line.
    A dropless row (no capacity) is a diamond on accuracy vs cost and a dash-dotted line of its K's colour on
    the speed panel. The legend sits below the panels.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), layout="constrained")
    acc, speed, dropped_all, dropped_any = axes.flat
    curves: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    capacity_rows = [row for row in results["rows"] if not row.get("dropless")]
    for row in capacity_rows:
        curves.setdefault((row["k"], row["bpr"]), []).append(row)
    ks = sorted({row["k"] for row in results["rows"]})
    trained = results["trained"]
    for (k, bpr), rows in sorted(curves.items(), key=lambda item: (item[0][0], not item[0][1])):
        rows = sorted(rows, key=lambda r: r["capacity_factor"])
        style = _curve_style(ks.index(k), bpr)
        label = f"K={k}{' (above trained)' if k > trained['k'] else ''}, {'BPR' if bpr else 'vanilla'}"
        cf = [r["capacity_factor"] for r in rows]
        acc.plot([r["gflops"] for r in rows], [100 * r["top1"] for r in rows], label=label, **style)
        _speed_curve(speed, cf, rows, style)
        dropped_all.plot(cf, [100 * r["dropped_all"] for r in rows], **style)
        dropped_any.plot(cf, [100 * r["dropped_any"] for r in rows], **style)
        _mark_trained(acc, rows, trained)
    _dropless_points(acc, speed, [row for row in results["rows"] if row.get("dropless")], ks)
    _dense_twin(acc, speed, results.get("baseline"))
    split = results["split"]
    acc.set(xlabel="GFLOPs per image (analytic)", ylabel=f"top-1 on {split} (%)", title="accuracy and cost")
    speed.set(ylabel="images/s (measured)", title="measured speed: median, bar = range over repeats")
    speeds = [r[key] for r in results["rows"] for key in ("images_per_s", "images_per_s_min") if r.get(key)]
    if max(speeds) > 10 * min(speeds):  # a busy machine: a linear axis would flatten the slow settings
        speed.set_yscale("log")
    dropped_all.set(ylabel="tokens dropped (%)", title="tokens dropped by all of their choices")
    dropped_any.set(ylabel="tokens dropped (%)", title="tokens dropped by at least one choice")
    capacities = sorted({r["capacity_factor"] for r in capacity_rows})
    for ax in (speed, dropped_all, dropped_any):
        ax.set(xlabel="capacity factor", xscale="log")
        ax.set_xticks(capacities, [f"{cf:g}" for cf in capacities], minor=False)
        ax.set_xticks([], minor=True)
        if trained.get("capacity_factor"):
            ax.axvline(trained["capacity_factor"], color="grey", linestyle=":", linewidth=1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle(f"capacity sweep of {results['checkpoint']} on {results['data']} (dotted vertical: trained cf)")
    return fig


def _curve_style(index: int, bpr: bool) -> dict[str, Any]:
    """Colour and marker from the K's index; solid with filled markers for BPR, dashed with larger open ones
    otherwise, so that a vanilla point on a BPR point shows as a ring around it."""
    colour = COLOURS[index % len(COLOURS)]
    return {
        "color": colour, "marker": MARKERS[index % len(MARKERS)], "markersize": 6 if bpr else 8,
        "linestyle": "-" if bpr else "--", "markerfacecolor": colour if bpr else "none", "zorder": 3 if bpr else 4,
    }  # fmt: skip


def _mark_trained(ax: Any, rows: list[dict[str, Any]], trained: dict[str, Any]) -> None:
    """A black ring around the trained setting's point, when the sweep has it."""
    for r in rows:
        if (r["k"], r["capacity_factor"], r["bpr"]) == (trained["k"], trained["capacity_factor"], trained["bpr"]):
            label = f"trained: K={r['k']}, cf {r['capacity_factor']:g}, {'BPR' if r['bpr'] else 'vanilla'}"
            ax.plot([r["gflops"]], [100 * r["top1"]], "o", markersize=16, markerfacecolor="none",
                    markeredgecolor="black", markeredgewidth=1.5, zorder=5, label=label)  # fmt: skip


def _speed_curve(ax: Any, cf: list[float], rows: list[dict[str, Any]], style: dict[str, Any]) -> None:
    """Median images/s per capacity factor, with bars over the repeats' range where the sweep recorded it."""
    median = [r["images_per_s"] for r in rows]
    if all(r.get("images_per_s_min") is not None for r in rows):
        spread = [[m - r["images_per_s_min"] for m, r in zip(median, rows, strict=True)],
                  [r["images_per_s_max"] - m for m, r in zip(median, rows, strict=True)]]  # fmt: skip
        ax.errorbar(cf, median, yerr=spread, capsize=3, elinewidth=1, **style)
    else:
        ax.plot(cf, median, **style)


def _dropless_points(acc: Any, speed: Any, rows: list[dict[str, Any]], ks: list[int]) -> None:
    """Each dropless row: a diamond at its top-1 and GFLOPs, and its images/s as a line across the speed panel."""
    for r in rows:
        colour = COLOURS[ks.index(r["k"]) % len(COLOURS)]
        acc.plot([r["gflops"]], [100 * r["top1"]], "D", color=colour, markersize=9, markeredgecolor="black",
                 zorder=6, label=f"K={r['k']}, dropless")  # fmt: skip
        speed.axhline(r["images_per_s"], color=colour, linestyle="-.", linewidth=1)


def _dense_twin(acc: Any, speed: Any, base: dict[str, Any] | None) -> None:
    """The dense twin: a star on accuracy vs cost with a dotted line at its top-1, and its speed as a dotted line
    with a grey band over its repeats' range."""
    if not base:
        return
    acc.plot([base["gflops"]], [100 * base["top1"]], "*", color="black", markersize=14, zorder=6,
             label=f"dense twin ({100 * base['top1']:.2f}%)")  # fmt: skip
    acc.axhline(100 * base["top1"], color="black", linestyle=":", linewidth=1)
    speed.axhline(base["images_per_s"], color="black", linestyle=":", linewidth=1)
    if base.get("images_per_s_min") is not None:
        speed.axhspan(base["images_per_s_min"], base["images_per_s_max"], color="grey", alpha=0.15, linewidth=0)
    speed.annotate("dense twin", (0.01, base["images_per_s"]), xycoords=("axes fraction", "data"), fontsize=8,
                   va="bottom")  # fmt: skip
