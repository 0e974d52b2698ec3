"""The routing analysis's figures (eval/routing_analysis.py): one function per figure, each drawing from the
analysis's summary, writing one PNG and returning its entry for summary.json (file, title, caption)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmoe_cli.eval.plots import COLOURS, HATCHES, MARKERS, pyplot, save_figure

Figure = dict[str, str]  # {"file", "title", "caption"}
ANNOTATE_CELLS = 200  # heatmaps and patch maps with at most this many cells get their values written in them


@dataclass
class PatchMaps:
    """Per-token routing of the few patch-map images, as `[B, h, w]` grids of the patch tokens per MoE block."""

    pixels: np.ndarray  # [B, H, W] or [B, H, W, 3] in 0..1, as a viewer shows the images
    labels: list[int]
    first: dict[int, np.ndarray] = field(default_factory=dict)  # first-choice expert of each patch
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # processed by >= 1 expert, analysed setting
    low: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # "vanilla" / "bpr" -> kept at K=1, cf LOW


def draw(summary: dict[str, Any], maps: PatchMaps | None, low_capacity: float, out: Path) -> list[Figure]:
    """Every figure that applies to the summary's router, in reading order, written into `out`."""
    layers = {int(b): v for b, v in summary["layers"].items()}
    if any("slot_entropy_nats" in v for v in layers.values()):  # Soft MoE: no plan, nothing placed or dropped
        return [soft_entropy(layers, summary["routing"]["tokens_per_image"], out)]
    figures = [load(layers, out)]
    if summary["routing"]["router"] in ("token_choice", "sinkhorn_token_choice", "per_image"):
        figures.append(drops(layers, summary["routing"]["k"], out))
    figures.append(experts_per_token(layers, out))
    if "per_image" in summary:
        figures.append(per_image(summary["per_image"], summary["classes"], out))
    else:
        figures.append(classes(layers, summary["classes"], out))
    if maps is not None:
        figures.append(patches(maps, summary, out))
        if maps.low:
            figures.append(bpr_patches(maps, summary["classes"], low_capacity, out))
    return figures


def _entry(fig: Any, out: Path, file: str, title: str, caption: str) -> Figure:
    save_figure(fig, out / file)
    return {"file": file, "title": title, "caption": caption}


def _panels(count: int, columns: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A constrained-layout figure of `count` panels in rows of `columns`; unused panels hidden."""
    plt = pyplot()
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


# ---------------------------------------------------------------------------------------------------- per layer


def load(layers: dict[int, dict[str, Any]], out: Path) -> Figure:
    """Per layer, each expert's placed tokens (solid) and received choices (hatched) as % of its capacity."""
    fig, axes = _panels(len(layers), 3, (4.2, 3.2))
    for ax, (block, layer) in zip(axes, layers.items(), strict=True):
        experts = np.arange(len(layer["load"]))
        width = 0.4 if layer["requested"] is not None else 0.7
        ax.bar(experts - (width / 2 if layer["requested"] else 0), 100 * np.array(layer["load"]), width,
               color=COLOURS[0], edgecolor="black", label="placed (kept)")  # fmt: skip
        if layer["requested"] is not None:
            ax.bar(experts + width / 2, 100 * np.array(layer["requested"]), width, color="white",
                   edgecolor=COLOURS[1], hatch="//", label="received (kept or dropped)")  # fmt: skip
        ax.axhline(100, color="black", linestyle="--", linewidth=1, label="capacity")
        ax.set(title=f"block {block}", xlabel="expert", ylabel="% of capacity", xticks=experts)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    busiest = max((max(v["requested"] or v["load"]), b) for b, v in layers.items())
    caption = (f"Each expert's tokens placed in its buffer and the choices it received, as a share of its capacity "
               f"(C slots per routing group); the most wanted expert receives {100 * busiest[0]:.0f}% of its "
               f"capacity (block {busiest[1]}).")  # fmt: skip
    return _entry(fig, out, "load.png", "Expert load against capacity", caption)


def drops(layers: dict[int, dict[str, Any]], k: int, out: Path) -> Figure:
    """Grouped bars per layer: the share of tokens whose r-th choice was dropped, and those dropped by all."""
    fig, ax = pyplot().subplots(figsize=(max(5.0, 1.6 * len(layers) + 3), 3.8), layout="constrained")
    series = [(f"choice {r + 1}", [v["dropped_by_rank"][r] for v in layers.values()]) for r in range(k)]
    series.append(("all choices (token skips the layer)", [v["dropped_all"] for v in layers.values()]))
    width = 0.8 / len(series)
    x = np.arange(len(layers))
    for i, (label, shares) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [100 * s for s in shares], width, label=label,
                      color=COLOURS[i % len(COLOURS)], edgecolor="black", hatch=HATCHES[i % len(HATCHES)])  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set(xticks=x, xticklabels=[f"block {b}" for b in layers], ylabel="tokens dropped (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    worst = max((v["dropped_all"], b) for b, v in layers.items())
    caption = (f"Share of tokens whose choice of each rank found its expert full, and of tokens dropped by all "
               f"their choices, which pass the layer on the residual path only: at most {100 * worst[0]:.1f}% "
               f"(block {worst[1]}).")  # fmt: skip
    return _entry(fig, out, "drops.png", "Dropped tokens by layer and choice rank", caption)


def experts_per_token(layers: dict[int, dict[str, Any]], out: Path) -> Figure:
    """Stacked horizontal bars per layer: the share of tokens processed by 0, 1 and 2+ experts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(layers) + 1.6), layout="constrained")
    y = np.arange(len(layers))
    left = np.zeros(len(layers))
    colours = plt.get_cmap("viridis")([0.1, 0.55, 0.95])
    for i, bucket in enumerate(("0", "1", "2+")):
        shares = np.array([100 * v["experts_per_token"][bucket] for v in layers.values()])
        ax.barh(y, shares, left=left, color=colours[i], edgecolor="black", hatch=HATCHES[i],
                label=f"{bucket} expert{'' if bucket == '1' else 's'}")  # fmt: skip
        for row, (start, share) in enumerate(zip(left, shares, strict=True)):
            if share >= 4:
                ax.text(start + share / 2, row, f"{share:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if i == 0 else "black",
                        bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1})  # fmt: skip
        left += shares
    ax.set(yticks=y, yticklabels=[f"block {b}" for b in layers], xlabel="tokens (%)", xlim=(0, 100))
    ax.invert_yaxis()
    fig.legend(loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    zero = max((v["experts_per_token"]["0"], b) for b, v in layers.items())
    caption = (f"How many experts process each token in each MoE layer; at most {100 * zero[0]:.1f}% of the tokens "
               f"get none (block {zero[1]}) and skip the layer on the residual path.")  # fmt: skip
    return _entry(fig, out, "experts-per-token.png", "Experts per token", caption)


def classes(layers: dict[int, dict[str, Any]], names: list[str], out: Path) -> Figure:
    """Per layer, the class x expert heatmap of first choices (rows sum to 1, NMI in the title), and the NMI
    of every layer in a last panel."""
    fig, axes = _panels(len(layers) + 1, 3, (4.4, 0.32 * len(names) + 1.6))
    vmax = max(max(max(row) for row in v["class_expert_share"]) for v in layers.values())
    for ax, (block, layer) in zip(axes, layers.items(), strict=False):
        image = _heatmap(ax, np.array(layer["class_expert_share"]), vmax)
        ax.set(title=f"block {block}: NMI {layer['specialisation_nmi']:.3f}", xlabel="first-choice expert")
        ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(image, ax=axes[:-1], label="share of the class's tokens", shrink=0.8)
    blocks = list(layers)
    nmi = [layers[b]["specialisation_nmi"] for b in blocks]
    axes[-1].plot(range(len(blocks)), nmi, marker="o", color="black")
    axes[-1].set(xticks=range(len(blocks)), xticklabels=[f"block {b}" for b in blocks], ylim=(0, max(0.05, *nmi) * 1.2),
                 ylabel="NMI(class; expert)", title="specialisation by class")  # fmt: skip
    axes[-1].grid(alpha=0.3)
    caption = (
        f"Share of each class's tokens whose first choice is each expert (rows sum to 1); the normalised "
        f"mutual information between class and expert goes from {nmi[0]:.3f} in block {blocks[0]} to "
        f"{nmi[-1]:.3f} in block {blocks[-1]} (0: experts ignore the class, 1: one expert per class group)."
    )
    return _entry(fig, out, "classes.png", "Which classes go to which expert", caption)


def _heatmap(ax: Any, values: np.ndarray, vmax: float) -> Any:
    """`values` as a cividis heatmap from 0 to `vmax`, each cell's value written in it when there are few."""
    image = ax.imshow(values, cmap="cividis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(values.shape[1]))
    if values.size <= ANNOTATE_CELLS:
        for (row, col), value in np.ndenumerate(values):
            text = f"{value:.2f}".removeprefix("0")  # ".42"; "1.00" stays
            ax.text(col, row, text, ha="center", va="center", fontsize=6.5,
                    color="black" if value > 0.55 * vmax else "white")  # fmt: skip
    return image


# ---------------------------------------------------------------------------------------------------- per image


def per_image(info: dict[str, Any], names: list[str], out: Path) -> Figure:
    """Per-image routing: each class's images per expert and, when guided, each super-class's."""
    groups = info.get("superclasses")
    fig, axes = _panels(2 if groups else 1, 2, (4.8, 0.32 * len(names) + 1.8))
    shares = np.array(info["class_expert_share"])
    order = np.argsort(groups, kind="stable") if groups else np.arange(len(names))
    image = _heatmap(axes[0], shares[order], 1.0)
    labels = [f"{names[c]} [{groups[c]}]" if groups else names[c] for c in order]
    axes[0].set_yticks(range(len(names)), labels, fontsize=8)
    axes[0].set(title=f"classes (NMI {info['specialisation_nmi']:.3f})", xlabel="expert of the image")
    caption = "Share of each class's images that the image router sends to each expert (rows sum to 1)"
    if groups:
        group_shares = np.array(info["superclass_expert_share"])
        _heatmap(axes[1], group_shares, 1.0)
        axes[1].set_yticks(range(len(group_shares)), [f"super-class {g}" for g in range(len(group_shares))])
        agree = info["images_to_superclass_expert"]
        axes[1].set(title=f"super-classes: {100 * agree:.1f}% to their expert", xlabel="expert of the image")
        caption += (
            f"; rows are labelled [super-class] and sorted by it, and {100 * agree:.1f}% of the images go to "
            "the expert of their super-class, as the guidance asks"
        )
    fig.colorbar(image, ax=axes, label="share of the images", shrink=0.8)
    return _entry(fig, out, "per-image.png", "Per-image routing by class", caption + ".")


# ---------------------------------------------------------------------------------------------------- patch maps


def patches(maps: PatchMaps, summary: dict[str, Any], out: Path) -> Figure:
    """Rows of images: the image, then each MoE layer's patch grid coloured (and numbered) by first-choice
    expert; patches dropped by all their choices are hatched."""
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    E = summary["routing"]["experts"]
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, E)))
    norm = BoundaryNorm(np.arange(-0.5, E), E)
    blocks = list(maps.first)
    fig, grid = _image_grid(len(maps.labels), 1 + len(blocks), colorbar=True)
    for i, label in enumerate(maps.labels):
        _show_image(grid[i][0], maps.pixels[i], summary["classes"][label])
        for j, block in enumerate(blocks, 1):
            first = maps.first[block][i]
            image = grid[i][j].imshow(first, cmap=cmap, norm=norm)
            if first.size <= ANNOTATE_CELLS // 2:
                for (r, c), e in np.ndenumerate(first):
                    grid[i][j].text(c, r, str(e), ha="center", va="center", fontsize=7,
                                    color="black" if e >= E / 2 else "white")  # fmt: skip
            _hatch(grid[i][j], ~maps.kept[block][i])
            if i == 0:
                grid[i][j].set_title(f"block {block}", fontsize=9)
    right = grid[0][-1].get_position().x1
    fig.colorbar(image, cax=fig.add_axes((right + 0.03, 0.25, 0.03, 0.5)), ticks=range(E), label="first-choice expert")
    routing = summary["routing"]
    caption = (f"The first image of {len(maps.labels)} classes, routed together as one group, beside each MoE "
               f"block's patch grid, each patch coloured and numbered by its first-choice expert at K={routing['k']}, "
               f"cf {routing['capacity_factor']}; hatched patches were dropped by all their choices.")  # fmt: skip
    return _entry(fig, out, "patches.png", "Patch maps: first-choice expert per patch", caption)


def bpr_patches(maps: PatchMaps, names: list[str], low_capacity: float, out: Path) -> Figure:
    """Rows of images: the image, then per MoE layer the patches that keep a slot at K=1 and a low capacity,
    vanilla beside BPR; dropped patches are covered (dark, hatched)."""
    blocks = list(maps.first)
    fig, grid = _image_grid(len(maps.labels), 1 + 2 * len(blocks), colorbar=False)
    kept_share = {}
    for i, label in enumerate(maps.labels):
        _show_image(grid[i][0], maps.pixels[i], names[label])
        for j, (block, name) in enumerate(((b, n) for b in blocks for n in ("vanilla", "bpr")), 1):
            kept = maps.low[name][block]
            kept_share[block, name] = kept.mean()
            _show_image(grid[i][j], maps.pixels[i], None)
            _hatch(grid[i][j], ~kept[i], cover=True)
    for j, (block, name) in enumerate(((b, n) for b in blocks for n in ("vanilla", "bpr")), 1):
        grid[0][j].set_title(f"block {block}\n{'BPR' if name == 'bpr' else 'vanilla'}", fontsize=9)
    kept = "; ".join(f"block {b}: {100 * kept_share[b, 'vanilla']:.0f}% vanilla, {100 * kept_share[b, 'bpr']:.0f}% BPR"
                     for b in blocks)  # fmt: skip
    caption = (f"At K=1 and capacity factor {low_capacity:g} about as many patches keep a slot with and without "
               f"Batch Priority Routing ({kept}), but not the same ones: vanilla routing fills the buffers in token "
               f"order (first images, top rows first) while BPR keeps the patches with the largest router weight; "
               f"covered patches are dropped.")  # fmt: skip
    return _entry(fig, out, "bpr-patches.png", f"Which patches keep a slot at capacity factor {low_capacity:g}",
                  caption)  # fmt: skip


def _image_grid(rows: int, cols: int, colorbar: bool) -> tuple[Any, list[list[Any]]]:
    """A grid of small image panels (and room for a colour bar on the right), laid out by hand: a layout engine
    costs seconds for this many panels."""
    width, height = 1.25 * cols + (1.2 if colorbar else 0.4), 1.25 * rows + 0.5
    fig, axes = pyplot().subplots(rows, cols, figsize=(width, height), squeeze=False,
                                  gridspec_kw={"wspace": 0.08, "hspace": 0.08})  # fmt: skip
    fig.subplots_adjust(left=0.3 / width, right=1 - (1.0 if colorbar else 0.1) / width, bottom=0.1 / height,
                        top=1 - 0.5 / height)  # fmt: skip
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, [list(row) for row in axes]


def _show_image(ax: Any, pixels: np.ndarray, label: str | None) -> None:
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
    if label is not None:
        ax.set_ylabel(label, fontsize=7)


def _hatch(ax: Any, mask_hw: np.ndarray, cover: bool = False) -> None:
    """Hatch (and with `cover`, darken) the patches of `mask_hw` on an axes showing a patch grid or the image."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    h, w = mask_hw.shape
    x0, x1 = ax.get_xlim()
    y1, y0 = ax.get_ylim()  # images put y = 0 at the top
    ph, pw = (y1 - y0) / h, (x1 - x0) / w
    boxes = [Rectangle((x0 + c * pw, y0 + r * ph), pw, ph) for r, c in zip(*np.nonzero(mask_hw), strict=True)]
    face = (0.1, 0.1, 0.1, 0.75) if cover else "none"
    ax.add_collection(
        PatchCollection(boxes, facecolor=face, edgecolor="white", hatch="x" if cover else "xx", linewidth=0)
    )


# ---------------------------------------------------------------------------------------------------- Soft MoE


def soft_entropy(layers: dict[int, dict[str, Any]], tokens: int, out: Path) -> Figure:
    """Per layer, every slot's effective number of tokens mixed (exp of its dispatch entropy), sorted."""
    fig, ax = pyplot().subplots(figsize=(7, 4), layout="constrained")
    for i, (block, layer) in enumerate(layers.items()):
        effective = np.sort(np.array(layer["slot_effective_tokens"]).ravel())
        ax.plot(np.arange(1, len(effective) + 1), effective, color=COLOURS[i % len(COLOURS)],
                marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(effective) // 12),
                linestyle=("-", "--", ":", "-.")[i % 4], label=f"block {block}")  # fmt: skip
    ax.axhline(tokens, color="black", linestyle=":", linewidth=1)
    ax.annotate(f"uniform over the image's {tokens} tokens", (0.01, tokens), xycoords=("axes fraction", "data"),
                va="top", fontsize=8)  # fmt: skip
    ax.set(xlabel="slot (sorted)", ylabel="effective tokens per slot (exp entropy)", ylim=(0, tokens * 1.1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    means = ", ".join(f"block {b} {np.mean(v['slot_effective_tokens']):.1f}" for b, v in layers.items())
    caption = (f"How many of an image's {tokens} tokens each Soft MoE slot mixes, as the exponential of its "
               f"dispatch weights' entropy averaged over images (1: one token, {tokens}: all equally); mean per "
               f"layer: {means}.")  # fmt: skip
    return _entry(fig, out, "soft-entropy.png", "Soft MoE: dispatch entropy per slot", caption)
