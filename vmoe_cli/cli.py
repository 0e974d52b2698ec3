"""The `vmoe` command: each subcommand parses options, calls one library function, renders the result.

User mistakes surface as `VmoeError`; `_Group.invoke` turns every one of them into a single
`error: ...` line on stderr and exit code 2, so no subcommand handles errors itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmoe_cli import __version__
from vmoe_cli.allocator import keep_freed_memory
from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.outputs import run_lock, writable_dir, writable_file
from vmoe_cli.progress import Display, ProgressFn

LOG_WIDTH = 100_000  # columns of a table printed to a log or pipe: a table takes only the width it needs
SET_HELP = "Override a recipe value, e.g. --set model.moe.k=1 (the value is YAML; repeatable)."
CACHE_DIR = click.option(
    "--cache-dir", type=click.Path(path_type=Path), default=lambda: os.environ.get("VMOE_CACHE", "~/.cache/vmoe"),
    show_default="$VMOE_CACHE or ~/.cache/vmoe", help="Where extracted features and sharded sources are kept.",
)  # fmt: skip


class _Group(click.Group):
    """A click group that reports VmoeError as one line on stderr, exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except VmoeError as e:
            click.echo(f"error: {e}", err=True)  # plain echo: rich would wrap long lines and eat [brackets]
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmoe")
def main() -> None:
    """vmoe: Vision Mixture-of-Experts (V-MoE) in PyTorch.

    \b
    Examples:
      vmoe model-info recipes/vmoe-s32-last2.yaml
      vmoe model-info recipes/digits-vit.yaml --set model.moe.k=1 --set model.moe.bpr=true
      vmoe shard digits --out shards/digits --minival 0.1 --test 0.2 --shard-size 200
      vmoe shard-info shards/digits --verify
      vmoe shard-index 'https://host/data/train-{000000..000099}.tar' --out shards/web-index
      vmoe pretrain recipes/digits-vmoe.yaml --out runs/digits-vmoe
      vmoe finetune recipes/digits-vmoe-finetune.yaml --from runs/digits-vmoe
      vmoe fewshot --checkpoint runs/digits-vmoe shards/digits
      vmoe sweep-capacity shards/digits --checkpoint runs/digits-vmoe --baseline runs/digits-vit
      vmoe report runs/digits-vmoe
      vmoe routing runs/digits-vmoe shards/digits
      vmoe superclasses shards/fmnist --checkpoint runs/fmnist-vit --experts 4 --out superclasses.json
      vmoe convert-jax vmoe_s32_last2_ilsvrc2012_randaug_light1 --out runs/vmoe-s32-jax
      vmoe quickstart
    """
    keep_freed_memory()  # no page faults on every step's large activations (vmoe_cli/allocator.py)


@main.command("model-info")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def model_info(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Print the model card of RECIPE.

    Sizes, MoE blocks, experts and capacity, parameter counts and analytic FLOPs per image.
    """
    from vmoe_cli.eval.flops import model_card  # imported here so `vmoe --help` does not load torch

    cfg = load_recipe(recipe, overrides)
    _console().print(_card_table(recipe.name, model_card(cfg.model), cfg.description))


def _card_table(title: str, card: dict[str, object], caption: str = "") -> Table:
    """A property / value table (model cards, conversion summaries)."""
    table = Table(title=title, caption=caption or None)
    table.add_column("property")
    table.add_column("value", justify="right")
    for label, value in card.items():
        table.add_row(Text(label), Text(_format(value)))  # Text: no rich markup in values
    return table


@main.command("shard")
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--minival", default=0.0, show_default=True, help="Fraction of train held out as the 'minival' split.")
@click.option("--test", default=0.0, show_default=True, help="Fraction of train held out as 'test' (digits has none).")
@click.option("--encoding", type=click.Choice(["keep", "png", "jpg"]), default="keep", show_default=True,
              help="keep: store JPEG/PNG/WebP bytes as they are (other formats and arrays become PNG).")  # fmt: skip
@click.option("--validate", type=click.Choice(["fast", "full", "none"]), default="fast", show_default=True,
              help="How keep checks an image it stores as it is. fast: its structure (baseline JPEG headers and "
                   "markers, PNG checksums), decoding what fails or has no such check; full: decode every image; "
                   "none: the header only.")  # fmt: skip
@click.option("--quality", default=95, show_default=True, help="JPEG quality when encoding to jpg.")
@click.option("--resize", type=int, help="Shrink images so the shorter side is this many pixels (never enlarges).")
@click.option("--shard-size", default=5000, show_default=True, help="Most samples per shard.")
@click.option("--shard-bytes", help="Most bytes per shard, e.g. 500MB or 1GiB (planned from input sizes).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample order and of the hold-outs.")
@click.option("--limit", type=int, help="Keep only the first N samples of each split (after shuffling).")
@click.option("--class-names", help="Comma-separated class names replacing the source's, in label order.")
@click.option("--workers", default=os.cpu_count() or 1, show_default="CPU cores", help="Processes writing shards.")
@click.option("--max-skipped", type=float, help="Fail when more than this fraction of the inputs is unusable.")
@click.option("--overwrite", is_flag=True, help="Replace the shards of a different job in --out.")
@click.option("--plan-only", is_flag=True,
              help="List the source and plan the shards, reading no image; print the plan and keep it in --out, "
                   "where the run that writes the shards starts from it.")  # fmt: skip
@click.option("--dry-run", is_flag=True,
              help="Write nothing. Reads and validates every input (decoding as --validate says) and counts; "
                   "with --plan-only, only prints the plan.")  # fmt: skip
def shard(source: str, out_dir: Path, workers: int, max_skipped: float | None, overwrite: bool, plan_only: bool,
          dry_run: bool, class_names: str | None, shard_bytes: str | None, **options: object) -> None:  # fmt: skip
    """Shard SOURCE into WebDataset tars in --out, with manifest.json, sizes.json and skipped.jsonl.

    SOURCE is 'digits' (scikit-learn's 8x8 digits), an MNIST-style IDX folder (train-/t10k-images-idx3-ubyte[.gz]
    and labels), a folder with one sub-folder per class (optionally under train/ and val/ or test/), or a
    .csv/.tsv/.jsonl list with path and label columns (and optionally split). Rerunning an interrupted command
    finishes the job without listing the source again or redoing finished shards.
    """
    from vmoe_cli.data.manifest import MANIFEST, STATE_DIR
    from vmoe_cli.data.shard import ShardOptions, write_shards
    from vmoe_cli.data.sources import open_source

    names = [name.strip() for name in class_names.split(",")] if class_names else None
    opts = ShardOptions(shard_bytes=_parse_bytes(shard_bytes) if shard_bytes else None, **options)
    src = open_source(source, class_names=names)
    complete = (out_dir / MANIFEST).is_file() and not (overwrite or dry_run)
    start = time.perf_counter()
    try:
        with Display() as display:
            manifest = write_shards(
                src, out_dir, opts, workers=workers, overwrite=overwrite, max_skipped=max_skipped, dry_run=dry_run,
                plan_only=plan_only, progress=display, say=display.echo,
            )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to finish the job", err=True)
        raise SystemExit(130) from None
    seconds = time.perf_counter() - start
    if complete:
        click.echo(f"{out_dir}: already complete ({MANIFEST} is there); nothing to do")
        return
    caption = "plan only: no image read" if plan_only else "dry run: nothing written" if dry_run else ""
    _console().print(_splits_table(f"{source} -> {out_dir}", manifest, caption))
    click.echo(f"{len(manifest['classes'])} classes", nl=False)
    if plan_only:
        kept = "nothing written" if dry_run else f"plan kept in {out_dir / STATE_DIR}"
        click.echo(f"; listed and planned in {seconds:.1f} s; {kept}")
        return
    click.echo(f"; {manifest['skipped']} inputs skipped", nl=False)
    if manifest["skipped"] and manifest["report"]:
        click.echo(f" (reasons in {out_dir / manifest['report']})", nl=False)
    writing = display.phases.get("writing")  # this run's images: a resumed job's earlier shards excluded
    images = writing.done - writing.first if writing else 0
    click.echo(f"; {images:,} images read in {seconds:.1f} s, {images / seconds:,.0f} images/s")
    for entry in manifest.get("skipped_inputs", [])[:20]:
        click.echo(f"  skipped {entry['id']}: {entry['reason']}")


def _splits_table(title: str, manifest: dict, caption: str = "") -> Table:
    """Samples, shards and bytes per split of a manifest (or of a plan: no bytes)."""
    table = Table(title=title, caption=caption or None)
    for column in ("split", "samples", "shards", "bytes"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in manifest["splits"].items():
        size = sum(s["bytes"] or 0 for s in info["shards"])
        table.add_row(split, f"{info['count']:,}", str(len(info["shards"])), f"{size:,}" if size else "-")
    return table


@main.command("shard-index")
@click.argument("shards", metavar="SHARDS...", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder of the index.")
@click.option("--split", help="Split of every shard [default: the train/val/test/minival word in each name].")
@click.option("--label-key", help="Take labels from this key of each sample's .json [default: its .cls].")
@click.option("--class-names", help="Comma-separated names in label order, or a file with one per line [0, 1, ...].")
@click.option("--sha256/--no-sha256", default=True, show_default=True,
              help="Hash every shard as it streams: `shard-info --verify` and feature caches rely on it.")  # fmt: skip
@click.option("--workers", default=os.cpu_count() or 1, show_default="CPU cores", help="Shards scanned at once.")
def shard_index(shards: tuple[str, ...], out_dir: Path, split: str | None, label_key: str | None,
                class_names: str | None, sha256: bool, workers: int) -> None:  # fmt: skip
    """Index existing WebDataset tars where they are, so every vmoe command reads them: writes --out/manifest.json.

    SHARDS are paths, brace patterns (train-{000000..000099}.tar), http(s):// URLs, pipe:COMMAND (the tar on the
    command's stdout) or URLs fsspec reads (s3://, gs://, with fsspec and its backend installed). Each shard is
    streamed once; nothing is copied. The index is signed with your key (~/.config/vmoe/index.key), as it may
    name any file or command: vmoe reads only indexes its user made. Rerunning an interrupted command scans only
    the shards it had not finished.

    \b
    Example:
      vmoe shard-index 'data/in1k-train-{0000..1023}.tar' 'data/in1k-val-{00..63}.tar' --out shards/in1k-index
    """
    from vmoe_cli.data.index import IndexOptions, index_shards

    writable_dir(out_dir, "--out")
    names = _class_names(class_names) if class_names else None
    options = IndexOptions(split=split, label_key=label_key, class_names=names, sha256=sha256)
    start = time.perf_counter()
    try:
        with Display() as display:
            manifest = index_shards(shards, out_dir, options, workers=workers, progress=display, say=display.echo)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to finish the index", err=True)
        raise SystemExit(130) from None
    seconds = time.perf_counter() - start
    _console().print(_splits_table(f"index: {out_dir}", manifest))
    images = sum(info["count"] for info in manifest["splits"].values())
    click.echo(f"{len(manifest['classes'])} classes; wrote {out_dir / 'manifest.json'}; "
               f"{seconds:.1f} s, {images / seconds:,.0f} images/s")  # fmt: skip


def _class_names(text: str) -> list[str]:
    """--class-names: a file with one name per line, or comma-separated names."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise VmoeError(f"--class-names {text}: unreadable ({e})") from None
    return [name.strip() for name in text.split(",")]


@main.command("shard-info")
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every shard's sha256 against the manifest (streams remote ones).")
@click.option("--ranks", default=1, show_default=True, help="Training processes that will read the shards.")
@click.option("--workers", default=1, show_default=True, help="Data-loader workers per rank.")
@click.option("--train-split", default="train", show_default=True,
              help="The split trained on: its shards are divided over ranks x workers (others by sample).")  # fmt: skip
def shard_info_command(out_dir: Path, verify: bool, ranks: int, workers: int, train_split: str) -> None:
    """Counts per split and class of the shards in DIR, and problems for RANKS x WORKERS readers."""
    from vmoe_cli.data.manifest import INDEX_FORMAT, shard_info

    with _progress_bar() as show:
        info = shard_info(out_dir, verify=verify, ranks=ranks, workers=workers, train_split=train_split, progress=show)
    manifest = info["manifest"]
    splits = list(manifest["splits"])
    table = Table(title=f"{out_dir}: {manifest['source']}")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for name in manifest["classes"]:
        table.add_row(Text(name), *(f"{manifest['splits'][s]['class_counts'][name]:,}" for s in splits))
    table.add_section()
    table.add_row("samples", *(f"{manifest['splits'][s]['count']:,}" for s in splits))
    table.add_row("shards", *(str(len(manifest["splits"][s]["shards"])) for s in splits))
    _console().print(table)
    if manifest["format"] == INDEX_FORMAT:
        click.echo(f"an index of shards outside {out_dir}: " + ", ".join(manifest["patterns"][:3]))
    else:
        click.echo(f"{manifest['skipped']} inputs skipped at sharding (see {out_dir / manifest['report']})")
    for problem in info["problems"]:
        click.echo(f"warning: {problem}", err=True)
    if info["failed"]:
        shown = "; ".join(info["failed"][:3]) + ("; ..." if len(info["failed"]) > 3 else "")
        raise VmoeError(f"{out_dir}: {len(info['failed'])} shard(s) failed verification: {shown}")
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    checked = "size and sha256" if all("sha256" in s for s in shards) else "size; the index has no sha256"
    line = f"{len(shards)} shards " + (f"verified ({checked})" if verify else "present with the right sizes")
    if info["unchecked"]:
        line = f"{len(shards) - info['unchecked']} local shards present with the right sizes; {info['unchecked']} "
        line += "remote shards not read (--verify streams them)"
    click.echo(line)


@main.command("pretrain")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory [default: runs/RECIPE].")
@click.option("--resume", metavar="latest|PATH", help="Continue from the run's newest checkpoint, or from PATH.")
def pretrain(recipe: Path, overrides: tuple[str, ...], out_dir: Path | None, resume: str | None) -> None:
    """Train the model of RECIPE from scratch; writes config.yaml, metrics.jsonl and checkpoints/.

    \b
    Multi-process (CPU or GPU), e.g.:
      torchrun --nproc_per_node 2 -m vmoe_cli.cli pretrain RECIPE
    """
    from vmoe_cli.train.loop import pretrain as run_pretrain

    out_dir = out_dir or Path("runs") / recipe.stem
    _run_training(lambda: run_pretrain(load_recipe(recipe, overrides), out_dir, resume), out_dir)


@main.command("finetune")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--from", "source", required=True, type=click.Path(path_type=Path),
              help="Checkpoint directory to start from, or a run directory (its newest checkpoint).")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Run directory [default: runs/RECIPE].")
@click.option("--resume", metavar="latest|PATH", help="Continue from the run's newest checkpoint, or from PATH.")
def finetune(recipe: Path, source: Path, overrides: tuple[str, ...], out_dir: Path | None, resume: str | None) -> None:
    """Fine-tune the weights of --from with RECIPE: new head, new resolution, classes and routing allowed.

    Same run directory, metrics, checkpoints and --resume as pretrain; on resume the run's own
    checkpoint is used and --from is not read.
    """
    from vmoe_cli.train.finetune import finetune as run_finetune

    out_dir = out_dir or Path("runs") / recipe.stem
    _run_training(lambda: run_finetune(load_recipe(recipe, overrides), source, out_dir, resume), out_dir)


@main.command("fewshot")
@click.argument("datasets", metavar="DATA...", nargs=-1, required=True)
@click.option(
    "--checkpoint",
    required=True,
    help="Checkpoint or run directory (its newest checkpoint), or 'pixels' for the raw-pixel floor.",
)
@click.option("--shots", default="1,5,10,25", show_default=True, help="Comma-separated examples per class.")
@click.option("--seeds", default=3, show_default=True, help="Few-shot draws per shot count.")
@click.option(
    "--l2",
    default="grid",
    show_default=True,
    help="'grid' (2^-10..2^19, chosen on held-out train examples) or a fixed value, e.g. 1024.",
)
@click.option(
    "--probe",
    "kind",
    type=click.Choice(["ridge", "logistic"]),
    default="ridge",
    show_default=True,
    help="Closed-form ridge (the papers' probe) or scikit-learn logistic regression.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Write JSON here and CSV beside it.")
@click.option("--k", type=int, help="Experts per token at inference [default: the checkpoint's].")
@click.option("--capacity-factor", type=float, help="Capacity factor at inference [default: the checkpoint's].")
@click.option("--bpr/--no-bpr", default=None, help="Batch Priority Routing at inference [default: the checkpoint's].")
@click.option(
    "--dropless/--no-dropless",
    default=None,
    help="Dropless execution (every choice computed) or capacity [default: the checkpoint's].",
)
@click.option("--batch-size", default=256, show_default=True, help="Images per forward pass.")
@CACHE_DIR
@click.option("--pixels-size", default=28, show_default=True, help="Image side for --checkpoint pixels.")
def fewshot(datasets: tuple[str, ...], checkpoint: str, shots: str, seeds: int, l2: str, kind: str, out: Path | None,
            k: int | None, capacity_factor: float | None, bpr: bool | None, dropless: bool | None, batch_size: int,
            cache_dir: Path, pixels_size: int) -> None:  # fmt: skip
    """Linear few-shot accuracy of a frozen backbone on each DATA (shards, an index or any `vmoe shard` source).

    Features (pre-logits) are extracted once per checkpoint and data and cached; a second call with other
    --shots, --seeds or --l2 only re-solves the probe. Sources without a test split get a seeded 20% hold-out.

    \b
    Example:
      vmoe fewshot --checkpoint runs/fmnist-vmoe shards/fmnist digits --out results/fewshot.json
    """
    from vmoe_cli.eval.fewshot import load_backbone, write_results
    from vmoe_cli.eval.probe import run_fewshot

    if out is not None:
        writable_file(out, "--out")
    shot_list = _int_list(shots, "--shots")
    fixed_l2 = None if l2 == "grid" else _positive_float(l2, "--l2")
    backbone = load_backbone(checkpoint, k, capacity_factor, bpr, dropless, pixels_size=pixels_size)
    with _progress_bar() as show:
        results = run_fewshot(
            backbone, datasets, shot_list, seeds, fixed_l2, kind, cache_dir, batch_size, progress=show
        )
    _console().print(fewshot_table(results))
    if out is not None:
        json_path, csv_path = write_results(results, out)
        click.echo(f"wrote {json_path} and {csv_path}")


def fewshot_table(results: dict) -> Table:
    """Few-shot results as a rich table: mean ± std per dataset and shot count, with the time split."""
    shots = results["shots"]
    title = f"{results['probe']} few-shot top-1 (%), mean ± std over {results['seeds']} seeds: {results['checkpoint']}"
    table = Table(title=title)
    table.add_column("data")
    for s in shots:
        table.add_column(f"{s}-shot", justify="right")
    table.add_column("extract s", justify="right")
    table.add_column("solve s", justify="right")
    for data, info in results["datasets"].items():
        cells = [f"{100 * info['summary'][s]['mean']:.1f}±{100 * info['summary'][s]['std']:.1f}" for s in shots]
        extract = "cached" if info["cached"] else f"{info['extract_seconds']:.1f}"
        table.add_row(data, *cells, extract, f"{info['solve_seconds']:.2f}")
    return table


@main.command("quickstart")
@click.option("--out", "out_dir", default="runs/quickstart", show_default=True, type=click.Path(path_type=Path),
              help="Where the runs, few-shot results and sweep go.")  # fmt: skip
@click.option("--shards", default="shards/digits", show_default=True, type=click.Path(path_type=Path),
              help="Where the digits shards go.")  # fmt: skip
@click.option("--recipes", default="recipes", show_default=True, type=click.Path(path_type=Path),
              help="Folder with digits-vmoe.yaml and digits-vit.yaml.")  # fmt: skip
@CACHE_DIR
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override both recipes, e.g. train.steps=50."
)
def quickstart(out_dir: Path, shards: Path, recipes: Path, cache_dir: Path, overrides: tuple[str, ...]) -> None:
    """The whole pipeline on scikit-learn's digits, a few minutes on a CPU; rerunning resumes.

    Shards digits, pre-trains a tiny V-MoE and its dense twin, probes both (and raw pixels) few-shot,
    sweeps the V-MoE's K x capacity x BPR at inference with the dense twin as baseline, and writes the V-MoE's
    report page (RUN/report.html), whose path it prints last.
    """
    from vmoe_cli.quickstart import run_quickstart

    writable_dir(out_dir, "--out")
    start = time.perf_counter()
    with _progress_bar() as show:
        done = run_quickstart(recipes, shards, out_dir, cache_dir, overrides, say=click.echo, progress=show)
    for results in done["fewshot"].values():
        _console().print(fewshot_table(results))
    _console().print(sweep_table(done["sweep"]))
    click.echo("artefacts:")
    for what, path in done["artefacts"].items():
        click.echo(f"  {what}: {path}")
    click.echo(f"quickstart done in {time.perf_counter() - start:.0f} s; open the report page (no server needed):")
    click.echo(f"  {done['artefacts']['report page']}")


@main.command("sweep-capacity")
@click.argument("data")
@click.option("--checkpoint", required=True, help="V-MoE checkpoint, or a run directory (its newest checkpoint).")
@click.option("--k", "ks", default="1,2", show_default=True, help="Experts per token to try (above trained is marked).")
@click.option("--capacity", default="0.1,0.25,0.5,0.75,1.0,1.25,1.5,2.0", show_default=True,
              help="Capacity factors to try.")  # fmt: skip
@click.option("--bpr", default="on,off", show_default=True, help="Batch Priority Routing settings: on, off or both.")
@click.option(
    "--dropless",
    is_flag=True,
    help="Also run each K dropless: every choice computed, no capacity (BPR then changes nothing).",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder [default: runs/sweep-NAME].")
@click.option("--baseline", help="Dense twin checkpoint or run directory, drawn as one point.")
@click.option("--split", default="test", show_default=True, help="Split evaluated.")
@click.option("--batch-size", default=256, show_default=True, help="Images per evaluation batch.")
@click.option("--throughput-batch", default=64, show_default=True, help="Images per timed forward pass.")
@click.option("--repeats", default=5, show_default=True, help="Timed passes per setting (median), after 2 warm-ups.")
@click.option(
    "--fewshot",
    "fewshot_shots",
    default=0,
    show_default=True,
    help="Also few-shot top-1 at this many shots per setting (extracts features per setting: slow).",
)
@CACHE_DIR
def sweep_capacity(data: str, checkpoint: str, ks: str, capacity: str, bpr: str, dropless: bool,
                   out_dir: Path | None, baseline: str | None, split: str, batch_size: int, throughput_batch: int,
                   repeats: int, fewshot_shots: int, cache_dir: Path) -> None:  # fmt: skip
    """Accuracy, dropped tokens, GFLOPs and measured speed of a V-MoE for every K x capacity x BPR setting.

    DATA is shards, a `vmoe shard-index` index or any `vmoe shard` source. Writes sweep.csv, sweep.json and
    sweep.png into --out; rerunning an interrupted sweep resumes where it stopped.

    \b
    Example:
      vmoe sweep-capacity shards/fmnist --checkpoint runs/fmnist-vmoe --baseline runs/fmnist-vit
    """
    import torch

    from vmoe_cli.eval.plots import plot_sweep
    from vmoe_cli.eval.sweep import SweepOptions, make_grid, sweep

    modes = {"on": [True], "off": [False], "on,off": [True, False], "off,on": [False, True]}
    if bpr.replace(" ", "") not in modes:
        raise VmoeError(f"--bpr: expected on, off or on,off, got {bpr!r}")
    capacities = _float_list(capacity, "--capacity")
    points = make_grid(_int_list(ks, "--k"), capacities, modes[bpr.replace(" ", "")], dropless)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = SweepOptions(split, batch_size, throughput_batch, repeats, fewshot_shots=fewshot_shots, device=device)
    out_dir = out_dir or Path("runs") / f"sweep-{Path(checkpoint).resolve().name}"
    start = time.perf_counter()
    with run_lock(out_dir):  # the plot too: one sweep's figure beside its own table
        with _progress_bar() as show:
            results = sweep(checkpoint, data, points, out_dir, options, baseline, cache_dir, progress=show)
        _console().print(sweep_table(results))
        plot = plot_sweep(results, out_dir / "sweep.png")
    click.echo(f"{len(points)} settings in {time.perf_counter() - start:.1f} s; wrote {out_dir}/sweep.csv, "
               f"sweep.json and {plot}")  # fmt: skip


def sweep_table(results: dict) -> Table:
    """The sweep as a rich table: one row per setting, the dense twin last."""
    trained = results["trained"]
    title = f"capacity sweep: {results['checkpoint']} on {results['data']} ({results['split']})"
    axes = results.get("axes", ["k", "capacity_factor", "bpr"])
    caption = f"{results.get('router', 'token_choice')} trained with K={trained['k']}, cf={trained['capacity_factor']}"
    caption += "; * = K above trained" if "k" in axes else "; K and BPR do not apply to this router (capacity only)"
    table = Table(title=title, caption=caption)
    columns = ["K", "BPR", "cf", "top-1 %", "dropped all %", "dropped any %", "GFLOPs", "images/s", "latency ms"]
    fewshot = any(r["fewshot_top1"] is not None for r in results["rows"])
    for name in [*columns, *(["few-shot %"] if fewshot else [])]:
        table.add_column(name, justify="right")
    for r in results["rows"]:
        k = f"{r['k']}{'*' if r['k_above_trained'] else ''}" if "k" in axes else "-"
        dropless = r.get("dropless", False)
        bpr = ("on" if r["bpr"] else "off") if "bpr" in axes and not dropless else "-"
        cells = [k, bpr, "dropless" if dropless else f"{r['capacity_factor']:g}", f"{100 * r['top1']:.2f}"]
        cells += [f"{100 * r['dropped_all']:.1f}", f"{100 * r['dropped_any']:.1f}", f"{r['gflops']:.3g}"]
        cells += [f"{r['images_per_s']:,.0f}", f"{r['latency_ms']:.1f}"]
        table.add_row(*cells, *([f"{100 * r['fewshot_top1']:.1f}"] if fewshot else []))
    base = results.get("baseline")
    if base:
        cells = ["dense", "", "", f"{100 * base['top1']:.2f}", "", "", f"{base['gflops']:.3g}"]
        table.add_row(*cells, f"{base['images_per_s']:,.0f}", f"{base['latency_ms']:.1f}", *([""] if fewshot else []))
    return table


@main.command("report")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="HTML file written [default: RUN_DIR/report.html].")
@click.option("--sweep", "sweeps", multiple=True, type=click.Path(path_type=Path),
              help="A vmoe sweep-capacity --out folder (or its sweep.json) to include; repeatable.")  # fmt: skip
@click.option("--fewshot", "fewshots", multiple=True, type=click.Path(path_type=Path),
              help="A vmoe fewshot --out JSON file to include; repeatable.")  # fmt: skip
def report(run_dir: Path, out: Path | None, sweeps: tuple[Path, ...], fewshots: tuple[Path, ...]) -> None:
    """Write one self-contained HTML page about the run in RUN_DIR.

    The recipe and model card, curves of metrics.jsonl, the routing analysis (RUN_DIR/routing), sweeps and
    few-shot results found in RUN_DIR or given, and the paths of the artefacts. Figures are embedded: the page
    needs no server, no network and no other file.

    \b
    Example:
      vmoe report runs/quickstart/digits-vmoe --sweep runs/quickstart/sweep
    """
    from vmoe_cli.eval.report_page import REPORT, write_report

    out = writable_file(out or run_dir / REPORT, "--out")
    done = write_report(run_dir, out, sweeps, fewshots)
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {done.path} ({done.figures} figures, {len(done.notes)} notes)")


@main.command("routing")
@click.argument("run", metavar="RUN_OR_CHECKPOINT")
@click.argument("data")
@click.option("--split", default="test", show_default=True, help="Split analysed.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Output folder [default: RUN/routing for a run directory, else runs/routing-NAME].")  # fmt: skip
@click.option("--images", type=int, help="Analyse only the split's first N images [default: all].")
@click.option("--k", type=int, help="Experts per token at inference [default: the checkpoint's].")
@click.option("--capacity-factor", type=float, help="Capacity factor at inference [default: the checkpoint's].")
@click.option("--bpr/--no-bpr", default=None, help="Batch Priority Routing at inference [default: the checkpoint's].")
@click.option("--dropless/--no-dropless", default=None,
              help="Compute every choice, drop nothing (token-choice routers) [default: checkpoint's].")  # fmt: skip
@click.option("--batch-size", default=256, show_default=True, help="Images per forward pass.")
@CACHE_DIR
def routing(run: str, data: str, split: str, out_dir: Path | None, images: int | None, k: int | None,
            capacity_factor: float | None, bpr: bool | None, dropless: bool | None, batch_size: int,
            cache_dir: Path) -> None:  # fmt: skip
    """What the routers of a V-MoE do on DATA: expert load, drops, experts per token, class x expert shares
    and their specialisation score, patch maps, and BPR vs vanilla at a low capacity.

    DATA is shards or any `vmoe shard` source. Writes PNG figures, the numbers behind them as CSV, and
    summary.json (the figures in order, with captions) into --out.

    \b
    Example:
      vmoe routing runs/fmnist-vmoe shards/fmnist --images 2000
    """
    import torch

    from vmoe_cli.eval.routing_analysis import RoutingOptions, analyse_routing

    if out_dir is None:
        out_dir = (
            Path(run) / "routing"
            if (Path(run) / "checkpoints").is_dir()
            else Path("runs") / f"routing-{Path(run).resolve().name}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = RoutingOptions(split, images, k, capacity_factor, bpr, dropless, batch_size, device)
    start = time.perf_counter()
    with _progress_bar() as show:
        summary = analyse_routing(run, data, out_dir, options, cache_dir, progress=show)
    _console().print(routing_table(summary))
    figures = ", ".join(f["file"] for f in summary["figures"])
    click.echo(f"{summary['images']} images in {time.perf_counter() - start:.1f} s; wrote {out_dir}/summary.json, "
               f"CSV files and {figures}")  # fmt: skip


def routing_table(summary: dict) -> Table:
    """The routing analysis per MoE block: drops, experts per token, busiest expert, specialisation."""
    routing = summary["routing"]
    setting = {  # only the settings the router has (Soft MoE: none at inference)
        "k": f"K={routing['k']}",
        "capacity_factor": f"cf {routing['capacity_factor']}"
        if routing["capacity"] is None
        else f"C={routing['capacity']}",
        "bpr": f"BPR {'on' if routing['bpr'] else 'off'}",
    }
    caption = ", ".join([routing["router"], f"E={routing['experts']}", *(setting[a] for a in routing["axes"])])
    if summary["top1"] is not None:
        caption += f"; top-1 {100 * summary['top1']:.2f}%"
    what = f"{summary['split']}, {summary['images']} images"
    table = Table(title=f"routing of {summary['checkpoint']} on {summary['data']} ({what})", caption=caption)
    layers = summary["layers"]
    if any("effective_tokens_mean" in v for v in layers.values()):  # Soft MoE
        table.add_column("block", justify="right")
        table.add_column("effective tokens per slot (mean)", justify="right")
        for block, v in layers.items():
            table.add_row(block, f"{v['effective_tokens_mean']:.2f}")
        return table
    columns = ["block", "dropped all %", "dropped any %", "0 / 1 / 2+ experts %", "busiest expert % of C", "NMI"]
    for name in columns:
        table.add_column(name, justify="right")
    for block, v in layers.items():
        spread = " / ".join(f"{100 * v['experts_per_token'][n]:.1f}" for n in ("0", "1", "2+"))
        busiest = max(v["requested"] or v["load"])
        table.add_row(block, f"{100 * v['dropped_all']:.1f}", f"{100 * v['dropped_any']:.1f}", spread,
                      f"{100 * busiest:.0f}", f"{v['specialisation_nmi']:.3f}")  # fmt: skip
    return table


@main.command("superclasses")
@click.argument("data")
@click.option("--checkpoint", required=True, help="Trained dense model (checkpoint or run directory) with a head.")
@click.option("--experts", required=True, type=int, help="Number of super-classes E: one per expert.")
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True, help="JSON file written.")
@click.option("--split", default="minival", show_default=True,
              help="Held-out slice of train the confusion matrix is measured on (never test).")  # fmt: skip
@CACHE_DIR
def superclasses(data: str, checkpoint: str, experts: int, out_file: Path, split: str, cache_dir: Path) -> None:
    """Group DATA's classes into E balanced super-classes for a per-image router (Mobile V-MoE).

    The confusion matrix of the model on a held-out slice of train is clustered spectrally into E
    groups of (nearly) equal size; the recipe key model.moe.superclasses takes the file.

    \b
    Example:
      vmoe superclasses shards/fmnist --checkpoint runs/fmnist-vit --experts 4 --out recipes/fmnist-superclasses.json
    """
    from vmoe_cli.eval.superclasses import find_superclasses, write_superclasses

    writable_file(out_file, "--out")
    with _progress_bar() as show:
        result = find_superclasses(checkpoint, data, experts, split, cache_dir, progress=show)
    write_superclasses(result, out_file)
    table = Table(
        title=f"{experts} super-classes of {data} from {checkpoint}",
        caption=f"{result['examples']} {split} images, held-out top-1 {100 * result['heldout_top1']:.1f}%",
    )
    table.add_column("super-class", justify="right")
    table.add_column("classes")
    for i, names in enumerate(result["groups"]):
        table.add_row(str(i), Text(", ".join(names)))
    _console().print(table)  # fmt: skip
    click.echo(f"wrote {out_file}")


@main.command("convert-jax")
@click.argument("prefix")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Run directory written.")
@click.option("--preset", default="vmoe-paper", show_default=True,
              help="Routing the weights cannot tell: vmoe-paper (K=2, cf 1.05, 8-image groups, bf16 dispatch) or "
                   "vmoe-finetune (cf 1.5).")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--check", type=click.Path(path_type=Path),
              help="Official outputs file (npz) to compare with, per setting and tensor, before writing.")  # fmt: skip
def convert_jax_command(
    prefix: str, out_dir: Path, preset: str, overrides: tuple[str, ...], check: Path | None
) -> None:
    """Convert an official JAX V-MoE checkpoint (PREFIX.index + PREFIX.data-*) into a vmoe checkpoint.

    The architecture comes from the arrays' shapes; routing from --preset and --set. The result
    runs through fewshot, sweep-capacity and finetune like any vmoe run directory.

    \b
    Example:
      vmoe convert-jax vmoe_s32_last2_ilsvrc2012_randaug_light1 --out runs/vmoe-s32-jax
    """
    from vmoe_cli.convert.fidelity import SETTING, TOLERANCE
    from vmoe_cli.convert.jax_to_vmoe import convert_jax
    from vmoe_cli.eval.flops import model_card

    writable_dir(out_dir, "--out")
    result = convert_jax(prefix, out_dir, preset, overrides, check)
    card = {"official index version": result.version or "unversioned (before 2022-06-22)",
            "official arrays": result.arrays, **model_card(result.recipe.model)}  # fmt: skip
    _console().print(_card_table(f"{prefix} -> {result.checkpoint}", card))
    if result.fidelity:
        settings = list(result.fidelity)
        table = Table(
            title=f"max |vmoe - official| per tensor ({check})",
            caption=f"tolerance: float32 dispatch {TOLERANCE['f32']:g}, bfloat16 {TOLERANCE['bf16']:g}",
        )
        table.add_column("tensor", no_wrap=True)
        for setting in settings:
            m = SETTING.match(setting)
            table.add_column(f"cf {m['cf']}\nBPR {m['bpr']}\n{m['disp']}", justify="right")
        for tensor in sorted({t for diffs in result.fidelity.values() for t in diffs}):
            table.add_row(tensor, *(f"{result.fidelity[s].get(tensor, float('nan')):.1e}" for s in settings))
        _console().print(table)  # fmt: skip
    click.echo(f"wrote {result.checkpoint} ({result.parameters:,} parameters)")


@contextlib.contextmanager
def _progress_bar() -> Iterator[ProgressFn]:
    """The command's progress display (vmoe_cli/progress.py): bars on a terminal, plain lines in a log."""
    with Display() as show:
        yield show


def _console() -> Console:
    """Standard output for tables: the terminal's width, or wide enough for every cell in a log or pipe (rich
    assumes 80 columns there and would wrap or cut cells)."""
    return Console() if sys.stdout.isatty() else Console(width=LOG_WIDTH)


def _int_list(text: str, option: str) -> list[int]:
    """'1,5,10' -> [1, 5, 10]; one-line error naming `option` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VmoeError(f"{option}: expected comma-separated integers like 1,5,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise VmoeError(f"{option}: expected positive integers, got {text!r}")
    return values


def _float_list(text: str, option: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]; one-line error naming `option` otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VmoeError(f"{option}: expected comma-separated numbers like 0.5,1,2, got {text!r}") from None
    if not values or min(values) <= 0:
        raise VmoeError(f"{option}: expected positive numbers, got {text!r}")
    return values


def _positive_float(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise VmoeError(f"{option}: expected 'grid' or a positive number, got {text!r}")
    return value


def _run_training(run: Callable[[], dict], out_dir: Path) -> None:
    """Run a training function; one line on Ctrl-C, the final evaluation on rank 0, the process group closed."""
    import torch.distributed as dist

    writable_dir(out_dir, "--out")
    start = time.perf_counter()
    try:
        result = run()
    except KeyboardInterrupt:
        click.echo(f"interrupted: continue with --out {out_dir} --resume latest", err=True)
        raise SystemExit(130) from None
    finally:  # torchrun: an orderly end; gloo aborts a process whose group is torn down at interpreter exit
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result and int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            f"{out_dir}: step {result['step']}, eval top-1 {result['eval_top1']:.4f} "
            f"({result['eval_correct']}/{result['eval_total']}), {time.perf_counter() - start:.1f} s"
        )


def _parse_bytes(text: str) -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '4096' -> 4096."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text, re.IGNORECASE)
    if not match:
        raise VmoeError(f"--shard-bytes: expected a size like 500MB or 1GiB, got {text!r}")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** "_kmgt".index(unit.lower() or "_"))


def _format(value: object) -> str:
    """Ints with thousands separators, floats to 3 significant digits (never in e-notation)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


if __name__ == "__main__":  # `python -m vmoe_cli.cli`, as torchrun runs it
    main()
