"""The capacity sweep's figure: accuracy vs GFLOPs, accuracy vs measured images/s, dropped tokens vs capacity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmoe_cli.errors import VmoeError


def plot_sweep(results: dict[str, Any], out: str | Path) -> Path:
    """Draw `results` (from eval.sweep.sweep) as one PNG of three panels; one curve per (K, BPR), and a diamond
    per dropless point (no capacity: it has no place on the dropped-tokens panel)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VmoeError(
            "the sweep plot needs matplotlib: pip install 'vmoe[plot]' (tables and CSV are written)"
        ) from None
    fig, (acc_flops, acc_speed, dropped) = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    curves: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    dropless_rows = [row for row in results["rows"] if row.get("dropless")]
    for row in results["rows"]:
        if not row.get("dropless"):
            curves.setdefault((row["k"], row["bpr"]), []).append(row)
    trained_k = results["trained"]["k"]
    for (k, bpr), rows in sorted(curves.items()):
        rows = sorted(rows, key=lambda r: r["capacity_factor"])
        style = {"marker": "o" if bpr else "s", "linestyle": "-" if bpr else "--", "markersize": 4}
        label = f"K={k}{' (above trained)' if k > trained_k else ''}, {'BPR' if bpr else 'vanilla'}"
        top1 = [100 * r["top1"] for r in rows]
        line = acc_flops.plot([r["gflops"] for r in rows], top1, label=label, **style)[0]
        acc_speed.plot([r["images_per_s"] for r in rows], top1, label=label, color=line.get_color(), **style)
        cf = [r["capacity_factor"] for r in rows]
        dropped.plot(cf, [100 * r["dropped_all"] for r in rows], label=f"{label}: by all", color=line.get_color(),
                     **style)  # fmt: skip
        dropped.plot(cf, [100 * r["dropped_any"] for r in rows], label=f"{label}: by any", color=line.get_color(),
                     alpha=0.4, **style)  # fmt: skip
    for row in dropless_rows:
        style = {"marker": "D", "markersize": 8, "linestyle": "none", "label": f"K={row['k']}, dropless"}
        point = acc_flops.plot([row["gflops"]], [100 * row["top1"]], **style)[0]
        acc_speed.plot([row["images_per_s"]], [100 * row["top1"]], color=point.get_color(), **style)
    base = results.get("baseline")
    if base:
        acc_flops.plot([base["gflops"]], [100 * base["top1"]], "k*", markersize=12, label="dense twin")
        acc_speed.plot([base["images_per_s"]], [100 * base["top1"]], "k*", markersize=12, label="dense twin")
    acc_flops.set(xlabel="GFLOPs per image (analytic)", ylabel=f"top-1 on {results['split']} (%)")
    acc_speed.set(xlabel="images/s (measured)", ylabel=f"top-1 on {results['split']} (%)")
    dropped.set(xlabel="capacity factor", ylabel="tokens dropped (%)", xscale="log")
    for ax in (acc_flops, acc_speed, dropped):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"capacity sweep of {results['checkpoint']} on {results['data']}")
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
