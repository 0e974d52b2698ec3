"""The `vmoe` command: each subcommand parses options, calls one library function, renders the result.

User mistakes surface as `VmoeError`; `_Group.invoke` turns every one of them into a single
`error: ...` line on stderr and exit code 2, so no subcommand handles errors itself.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmoe_cli import __version__
from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError

SET_HELP = "Override a recipe value, e.g. --set model.moe.k=1 (the value is YAML; repeatable)."


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
      vmoe shard digits --out shards/digits --minival 0.1
      vmoe shard-info shards/digits --verify
      vmoe pretrain recipes/digits-vmoe.yaml --out runs/digits-vmoe
      vmoe finetune recipes/digits-vmoe-finetune.yaml --from runs/digits-vmoe
    """


@main.command("model-info")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def model_info(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Print the model card of RECIPE.

    Sizes, MoE blocks, experts and capacity, parameter counts and analytic FLOPs per image.
    """
    from vmoe_cli.eval.flops import model_card  # imported here so `vmoe --help` does not load torch

    cfg = load_recipe(recipe, overrides)
    table = Table(title=recipe.name, caption=cfg.description or None)
    table.add_column("property")
    table.add_column("value", justify="right")
    for label, value in model_card(cfg.model).items():
        table.add_row(Text(label), Text(_format(value)))  # Text: no rich markup in values
    Console().print(table)


@main.command("shard")
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--minival", default=0.0, show_default=True, help="Fraction of train held out as the 'minival' split.")
@click.option("--encoding", type=click.Choice(["keep", "png", "jpg"]), default="keep", show_default=True,
              help="keep: store JPEG/PNG/WebP bytes as they are (other formats and arrays become PNG).")  # fmt: skip
@click.option("--quality", default=95, show_default=True, help="JPEG quality when encoding to jpg.")
@click.option("--resize", type=int, help="Shrink images so the shorter side is this many pixels (never enlarges).")
@click.option("--shard-size", default=5000, show_default=True, help="Most samples per shard.")
@click.option("--shard-bytes", help="Most bytes per shard, e.g. 500MB or 1GiB (planned from input sizes).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample order and of the minival hold-out.")
@click.option("--limit", type=int, help="Keep only the first N samples of each split (after shuffling).")
@click.option("--class-names", help="Comma-separated class names replacing the source's, in label order.")
@click.option("--workers", default=os.cpu_count() or 1, show_default="CPU cores", help="Processes writing shards.")
@click.option("--max-skipped", type=float, help="Fail when more than this fraction of the inputs is unusable.")
@click.option("--overwrite", is_flag=True, help="Replace the shards of a different job in --out.")
@click.option("--dry-run", is_flag=True, help="Read and validate every input, count, write nothing.")
def shard(source: str, out_dir: Path, workers: int, max_skipped: float | None, overwrite: bool, dry_run: bool,
          class_names: str | None, shard_bytes: str | None, **options: object) -> None:  # fmt: skip
    """Shard SOURCE into WebDataset tars in --out, with manifest.json, sizes.json and skipped.jsonl.

    SOURCE is 'digits' (scikit-learn's 8x8 digits), an MNIST-style IDX folder (train-/t10k-images-idx3-ubyte[.gz]
    and labels), a folder with one sub-folder per class (optionally under train/ and val/ or test/), or a
    .csv/.tsv/.jsonl list with path and label columns (and optionally split). Rerunning an interrupted command
    finishes the job without redoing finished shards.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeElapsedColumn

    from vmoe_cli.data.shard import ShardOptions, write_shards
    from vmoe_cli.data.sources import open_source

    class ImagesPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} images/s")

    names = [name.strip() for name in class_names.split(",")] if class_names else None
    opts = ShardOptions(shard_bytes=_parse_bytes(shard_bytes) if shard_bytes else None, **options)
    src = open_source(source, class_names=names)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), ImagesPerSecond(), TimeElapsedColumn())
    progress = Progress(*columns, console=Console(stderr=True), transient=True)
    bar = progress.add_task("dry run" if dry_run else "sharding", total=None)

    def show(done: int, total: int) -> None:
        if progress.console.is_terminal:  # a bar only for a person watching; logs get the summary
            progress.start()  # on the first call: after the checks, so an early error is one line
            progress.update(bar, completed=done, total=total)

    complete = (out_dir / "manifest.json").is_file() and not (overwrite or dry_run)
    start = time.perf_counter()
    try:
        manifest = write_shards(
            src, out_dir, opts, workers=workers, overwrite=overwrite, max_skipped=max_skipped, dry_run=dry_run,
            progress=show,
        )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to finish the job", err=True)
        raise SystemExit(130) from None
    finally:
        if progress.live.is_started:
            progress.stop()
    seconds = time.perf_counter() - start
    if complete:
        click.echo(f"{out_dir}: already complete (manifest.json is there); nothing to do")
        return
    table = Table(title=f"{source} -> {out_dir}", caption="dry run: nothing written" if dry_run else None)
    for column in ("split", "samples", "shards", "bytes"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in manifest["splits"].items():
        size = sum(s["bytes"] or 0 for s in info["shards"])
        table.add_row(split, f"{info['count']:,}", str(len(info["shards"])), f"{size:,}" if size else "-")
    Console().print(table)
    processed = sum(info["count"] for info in manifest["splits"].values()) + manifest["skipped"]
    click.echo(f"{len(manifest['classes'])} classes; {manifest['skipped']} inputs skipped", nl=False)
    if manifest["skipped"] and manifest["report"]:
        click.echo(f" (reasons in {out_dir / manifest['report']})", nl=False)
    click.echo(f"; {seconds:.1f} s, {processed / seconds:,.0f} images/s")
    for entry in manifest.get("skipped_inputs", [])[:20]:
        click.echo(f"  skipped {entry['id']}: {entry['reason']}")


@main.command("shard-info")
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every shard's sha256 against the manifest.")
@click.option("--ranks", default=1, show_default=True, help="Training processes that will read the shards.")
@click.option("--workers", default=1, show_default=True, help="Data-loader workers per rank.")
def shard_info_command(out_dir: Path, verify: bool, ranks: int, workers: int) -> None:
    """Counts per split and class of the shards in DIR, and problems for RANKS x WORKERS readers."""
    from vmoe_cli.data.shard import shard_info

    info = shard_info(out_dir, verify=verify, ranks=ranks, workers=workers)
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
    Console().print(table)
    click.echo(f"{manifest['skipped']} inputs skipped at sharding (see {out_dir / manifest['report']})")
    for problem in info["problems"]:
        click.echo(f"warning: {problem}", err=True)
    if info["failed"]:
        shown = "; ".join(info["failed"][:3]) + ("; ..." if len(info["failed"]) > 3 else "")
        raise VmoeError(f"{out_dir}: {len(info['failed'])} shard(s) failed verification: {shown}")
    total = sum(len(s["shards"]) for s in manifest["splits"].values())
    click.echo(f"{total} shards " + ("verified (size and sha256)" if verify else "present with the right sizes"))


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


def _run_training(run: Callable[[], dict], out_dir: Path) -> None:
    """Run a training function; one line on Ctrl-C, the final evaluation on rank 0."""
    start = time.perf_counter()
    try:
        result = run()
    except KeyboardInterrupt:
        click.echo(f"interrupted: continue with --out {out_dir} --resume latest", err=True)
        raise SystemExit(130) from None
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
