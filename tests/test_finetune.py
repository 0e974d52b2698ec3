"""finetune: new head, resized position grid, recipe routing, freezing, resume, one-line shape errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_train import metrics, settings

from vmoe_cli.checkpoint import find_resume, load_model
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.models.vit import resize_pos_embed
from vmoe_cli.train.finetune import initial_model
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "recipes" / "digits-vmoe.yaml"
FINETUNE = ROOT / "recipes" / "digits-vmoe-finetune.yaml"


@pytest.fixture(scope="module")
def source(digits, tmp_path_factory) -> Path:
    """A 5-step digits V-MoE at 8x8 pixels (4x4 position grid): the checkpoint fine-tuned from."""
    run = tmp_path_factory.mktemp("pretrained")
    pretrain(load_recipe(PRETRAIN, settings(digits, 5)), run)
    return find_resume(run, "latest")


def test_initial_model_has_new_head_resized_grid_and_recipe_routing(digits, source):
    recipe = load_recipe(FINETUNE, [f"data.shards={digits}", "model.num_classes=7"])
    model = initial_model(recipe, source.parent.parent)  # a run directory means its newest checkpoint
    old = load_file(source / "model.safetensors")
    assert torch.equal(model.head.weight, torch.zeros(7, 64))
    assert torch.allclose(model.head.bias, torch.full((7,), -math.log(7)))
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 64)
    assert torch.equal(model.pos_embed[:, 0], old["pos_embed"][:, 0])  # CLS row kept
    assert torch.equal(model.pos_embed, resize_pos_embed(old["pos_embed"], 6, has_cls=True))
    assert torch.equal(model.blocks[3].mlp.experts.w1, old["blocks.3.mlp.experts.w1"])
    assert model.cfg.moe.capacity_factor == 1.5


def test_finetune_trains_evaluates_freezes_and_resumes(digits, source, tmp_path):
    run = tmp_path / "run"
    args = ["finetune", str(FINETUNE), "--from", str(source), "--out", str(run)]
    args += sum((["--set", s] for s in settings(digits, 10, checkpoint_every=5, freeze="[patch_embed]")), [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(run) if "eval_top1" in r] == [10]
    model = load_model(find_resume(run, "latest"))
    assert model(torch.zeros(2, 1, 12, 12)).logits.shape == (2, 10)
    assert torch.equal(model.patch_embed.weight, load_file(source / "model.safetensors")["patch_embed.weight"])
    assert model.head.weight.abs().sum() > 0

    more = ["finetune", str(FINETUNE), "--from", str(tmp_path / "gone"), "--out", str(run), "--resume", "latest"]
    more += sum((["--set", s] for s in settings(digits, 15, checkpoint_every=5, freeze="[patch_embed]")), [])
    result = CliRunner().invoke(main, more)  # resuming reads the run's checkpoint, not --from
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(run) if "loss" in r] == [5, 10, 15]


@pytest.mark.parametrize(
    ("override", "tensor"),
    [("model.width=32", "tensor cls_token"), ("model.moe.num_experts=8", "blocks.1.mlp.router")],
)
def test_incompatible_checkpoint_is_one_line_naming_the_tensor(digits, source, tmp_path, override, tensor):
    args = ["finetune", str(FINETUNE), "--from", str(source), "--out", str(tmp_path / "run"), "--set", override]
    result = CliRunner().invoke(main, [*args, "--set", f"data.shards={digits}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and tensor in result.stderr


def test_freeze_prefix_naming_nothing_is_one_line(digits, source, tmp_path):
    args = ["finetune", str(FINETUNE), "--from", str(source), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, [*args, "--set", f"data.shards={digits}", "--set", "train.freeze=[block]"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "'block' names no parameter" in result.stderr


def test_paper_finetune_recipe_loads_its_pretrain_checkpoint(tmp_path):
    """V-MoE-S/32 pre-trained at 224 px -> fine-tuned at 384 px: grid 7x7 -> 12x12, pre-logits dropped."""
    pre = load_recipe(ROOT / "recipes" / "vmoe-s32-last2.yaml")
    from vmoe_cli.checkpoint import save_checkpoint
    from vmoe_cli.models.vit import VisionTransformer

    save_checkpoint(tmp_path, 1, VisionTransformer(pre.model).state_dict(), pre, {}, keep_last=1)
    model = initial_model(load_recipe(ROOT / "recipes" / "vmoe-s32-last2-ft384.yaml"), tmp_path)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 512) and model.cfg.moe.capacity_factor == 1.5
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.bias[0].item() == pytest.approx(-math.log(1000))
