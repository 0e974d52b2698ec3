"""convert-jax: the official checkpoint reader, the tree mapping, fidelity to the official outputs, errors.

The fixture (a tiny V-MoE written by the official checkpoint writer, with the official model's
outputs for 8 routing settings) lives outside the project, in ../shared/fixtures/vmoe-jax-tiny
(or $VMOE_JAX_FIXTURE); these tests are skipped when it is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from vmoe_cli.checkpoint import find_resume, load_model
from vmoe_cli.cli import main
from vmoe_cli.convert.fidelity import SETTING, TOLERANCE, compare_outputs
from vmoe_cli.convert.jax_checkpoint import read_jax_checkpoint
from vmoe_cli.convert.jax_to_vmoe import convert_jax, infer_model, to_state_dict
from vmoe_cli.errors import VmoeError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("VMOE_JAX_FIXTURE", ROOT.parent / "shared" / "fixtures" / "vmoe-jax-tiny"))
NAME = "vmoe_tiny_e4k2_last2_randomized"
PREFIX = FIXTURE / NAME
OUTPUTS = FIXTURE / f"{NAME}.outputs.npz"
GROUP = "model.moe.group_size=34"  # the fixture routes groups of 2 images x 17 tokens

pytestmark = pytest.mark.skipif(
    not (FIXTURE / f"{NAME}.index").is_file(),
    reason=f"official V-MoE fixture not found at {FIXTURE} (set VMOE_JAX_FIXTURE to its directory)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert_jax(PREFIX, out, overrides=(GROUP,))
    return find_resume(out, "latest")


def test_reader_is_bit_exact_with_the_official_arrays():
    arrays, version = read_jax_checkpoint(PREFIX)
    official = np.load(FIXTURE / f"{NAME}.params.npz")
    assert version == "20220622"
    assert sorted(arrays) == sorted(official.files) and len(arrays) == 76
    for name in official.files:
        assert arrays[name].dtype == official[name].dtype and np.array_equal(arrays[name], official[name]), name


def test_architecture_is_inferred_from_the_shapes(converted):
    cfg = load_model(converted).cfg
    assert (cfg.sizes(), cfg.image_size, cfg.channels) == ((4, 64, 128, 4, 8), 32, 3)
    assert (cfg.pool, cfg.representation_size, cfg.num_classes, cfg.moe_layers()) == ("cls", 64, 10, [1, 3])
    assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.capacity_factor, cfg.moe.group_size) == (4, 2, 1.05, 34)
    assert cfg.moe.bfloat16_dispatch and not cfg.moe.bpr
    assert sum(p.numel() for p in load_model(converted).parameters()) == 252_298


# the fixture's 8 settings (its README): listed here so that collection does not need the fixture
SETTINGS = [
    f"cf{cf}_bpr-{bpr}_disp-{disp}" for cf in ("1.05", "4.0") for bpr in ("off", "on") for disp in ("bf16", "f32")
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_reproduces_the_official_outputs(converted, setting):
    table = compare_outputs(load_model(converted), OUTPUTS)
    assert sorted(table) == sorted(SETTINGS)
    diffs = table[setting]
    precision = SETTING.match(setting)["disp"]
    for block in (1, 3):  # routing decisions are identical, not merely close
        for exact in ("dispatch_weights", "num_dropped", "capacity"):
            assert diffs[f"encoderblock_{block}/{exact}"] == 0, (setting, block, exact)
    for tensor, diff in diffs.items():
        assert diff <= TOLERANCE[precision], (setting, tensor, diff)
    assert len(diffs) == sum(n.startswith(setting + "/") for n in np.load(OUTPUTS).files) == 28  # all of them


def test_bfloat16_dispatch_changes_the_outputs(converted):
    """bf16 dispatch must really round: with it off, the bf16 settings' block outputs move off the official ones."""
    model = load_model(converted)
    table = compare_outputs(model, OUTPUTS)
    assert table["cf4.0_bpr-off_disp-bf16"]["hidden/encoderblock_3"] < 1e-4
    official = np.load(OUTPUTS)
    images = torch.from_numpy(official["inputs"]).permute(0, 3, 1, 2)
    model.set_routing(capacity_factor=4.0, bfloat16_dispatch=False)
    with torch.no_grad():
        logits = model(images).logits.numpy()
    assert np.abs(logits - official["cf4.0_bpr-off_disp-bf16/logits"]).max() > 1e-6
    assert np.abs(logits - official["cf4.0_bpr-off_disp-f32/logits"]).max() < 1e-5


def test_cli_converts_checks_and_the_result_runs_every_subcommand(tmp_path, digits):
    out = tmp_path / "jax"
    args = ["convert-jax", str(PREFIX), "--out", str(out), "--set", GROUP, "--check", str(OUTPUTS)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "max |vmoe - official|" in result.output and "252,298 parameters" in result.output
    sweep = ["sweep-capacity", "digits", "--checkpoint", str(out), "--out", str(tmp_path / "sweep"), "--k", "1,2"]
    sweep += ["--capacity", "1.05,4", "--repeats", "1", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, sweep)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 1 + 8
    fewshot = ["fewshot", "--checkpoint", str(out), "digits", "--shots", "2", "--seeds", "1"]
    result = CliRunner().invoke(main, [*fewshot, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output

    recipe = yaml.safe_load((find_resume(out, "latest") / "config.yaml").read_text())
    recipe["model"]["image_size"] = 48  # 4x4 position grid resized to 6x6
    recipe["model"]["moe"]["capacity_factor"] = 1.5
    recipe["data"]["shards"] = str(digits)
    recipe["data"]["eval_split"] = "minival"
    recipe["train"] = {"batch_size": 16, "steps": 2, "optimizer": "sgd", "lr": 0.01, "log_every": 1}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(recipe))
    args = ["finetune", str(tmp_path / "ft.yaml"), "--from", str(out), "--out", str(tmp_path / "ft")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert load_model(find_resume(tmp_path / "ft", "latest")).pos_embed.shape == (1, 37, 64)


def test_a_converted_checkpoint_is_not_resumable_and_says_to_finetune(converted, digits, tmp_path):
    recipe = yaml.safe_load((converted / "config.yaml").read_text())  # the same model: the resume gets that far
    recipe["data"].update(shards=str(digits), eval_split="minival")
    recipe["train"] = {"batch_size": 16, "steps": 2, "optimizer": "sgd", "lr": 0.01}
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(recipe))
    args = ["pretrain", str(tmp_path / "same.yaml"), "--out", str(tmp_path / "run"), "--resume", str(converted)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    assert result.stderr.strip() == (
        f"error: {converted}: written by `vmoe convert-jax`, it has no training state to resume; train from its "
        f"weights with `vmoe finetune RECIPE --from {converted}`"
    )


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["convert-jax", *args])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line
    return line


def test_missing_truncated_and_foreign_files_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / "partial" / NAME
    partial.parent.mkdir()
    shutil.copy(FIXTURE / f"{NAME}.index", f"{partial}.index")
    assert "data-00000-of-00001: no such file" in _cli_error(str(partial), "--out", str(out))

    data = (FIXTURE / f"{NAME}.data-00000-of-00001").read_bytes()
    Path(f"{partial}.data-00000-of-00001").write_bytes(data[: len(data) // 2])
    assert "data-00000-of-00001: not a complete msgpack file" in _cli_error(str(partial), "--out", str(out))

    Path(f"{partial}.index").write_bytes(b"\x93\x01\x02\x03")  # msgpack, but a list
    assert ".index: not an official V-MoE checkpoint index" in _cli_error(str(partial), "--out", str(out))
    assert _cli_error(str(tmp_path / "nothing"), "--out", str(out)).endswith(
        "nothing.index: no such file (an official checkpoint is PREFIX.index + PREFIX.data-*)"
    )
    assert not out.exists()


def test_unknown_names_and_unrepresentable_architectures_are_named():
    params, _ = read_jax_checkpoint(PREFIX)
    cfg = infer_model(params, "ckpt")
    with_bias = {**params, "Encoder/encoderblock_1/Moe/Router/dense/bias": np.zeros(4, np.float32)}
    with pytest.raises(VmoeError, match=r"ckpt: parameters vmoe does not know: Encoder/encoderblock_1/Moe/Router"):
        to_state_dict(with_bias, cfg, "ckpt")
    wider = {**params, "Encoder/encoderblock_0/Mlp/Dense_0/kernel": np.zeros((64, 256), np.float32)}
    with pytest.raises(VmoeError, match=r"ckpt: MLP sizes \[128, 256\] differ between blocks"):
        infer_model(wider, "ckpt")
    oblong = {**params, "embedding/kernel": np.zeros((8, 4, 3, 64), np.float32)}
    with pytest.raises(VmoeError, match="non-square patches 8x4"):
        infer_model(oblong, "ckpt")
    missing = {k: v for k, v in params.items() if k != "Encoder/encoderblock_2/LayerNorm_1/scale"}
    with pytest.raises(VmoeError, match="missing parameter 'Encoder/encoderblock_2/LayerNorm_1/scale'"):
        to_state_dict(missing, cfg, "ckpt")


def test_presets_set_and_failed_checks_write_nothing(tmp_path):
    out = str(tmp_path / "out")
    assert "E^3" in _cli_error(str(PREFIX), "--out", out, "--preset", "eee-s32")
    line = _cli_error(str(PREFIX), "--out", out, "--preset", "fast")
    assert "--preset 'fast': choose one of vmoe-paper, vmoe-finetune" in line
    line = _cli_error(str(PREFIX), "--out", out, "--set", "model.moe.num_experts=8")
    assert "no longer matches the checkpoint" in line
    official = dict(np.load(OUTPUTS))
    official["cf1.05_bpr-off_disp-f32/logits"] = official["cf1.05_bpr-off_disp-f32/logits"] + 1e-3
    np.savez(tmp_path / "tampered.npz", **official)
    line = _cli_error(str(PREFIX), "--out", out, "--set", GROUP, "--check", str(tmp_path / "tampered.npz"))
    assert "cf1.05_bpr-off_disp-f32 exceed the tolerance" in line and "nothing written" in line
    # the official groups are 2 images here: the paper preset's 8-image groups route differently
    line = _cli_error(str(PREFIX), "--out", out, "--check", str(OUTPUTS))
    assert "combine_weights has shape (2, 34, 4, 20), vmoe gives (1, 68, 4, 36)" in line and "group_size" in line
    assert not Path(out).exists()
