"""The `vmoe` command: version, help, model-info, and one-line errors with exit code 2."""

from pathlib import Path

from click.testing import CliRunner

from vmoe_cli import __version__
from vmoe_cli.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"vmoe, version {__version__}\n"


def test_help_lists_model_info_and_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "model-info" in result.output
    assert "vmoe model-info recipes/vmoe-s32-last2.yaml" in result.output


def test_model_info_prints_a_card():
    result = CliRunner().invoke(main, ["model-info", str(RECIPES / "digits-vmoe.yaml")])
    assert result.exit_code == 0, result.output
    assert "digits-vmoe.yaml" in result.stdout
    assert "parameters" in result.stdout


def test_bad_key_is_one_error_line_with_exit_code_2():
    recipe = str(RECIPES / "digits-vmoe.yaml")
    result = CliRunner().invoke(main, ["model-info", recipe, "--set", "model.moe.num_expert=4"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {recipe}: unknown key 'model.moe.num_expert' (did you mean 'num_experts'?)\n"
    assert "Traceback" not in result.output


def test_missing_recipe_is_one_error_line_with_exit_code_2(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    result = CliRunner().invoke(main, ["model-info", str(missing)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {missing}: no such recipe file")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
