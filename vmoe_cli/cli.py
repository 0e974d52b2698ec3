"""The `vmoe` command: each subcommand parses options, calls one library function, renders the result.

User mistakes surface as `VmoeError`; `_Group.invoke` turns every one of them into a single
`error: ...` line on stderr and exit code 2, so no subcommand handles errors itself.
"""

from __future__ import annotations

import math
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
