"""Resume runs no code from a run directory: the training state is JSON + safetensors (an older pickled
train_state.pt is read as plain data only), `checkpoints/last` names only the run's own checkpoints, and
every damaged or foreign file is one line naming it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vmoe_cli.checkpoint import find_resume, load_train_state, save_checkpoint
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.train.state import TrainState

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits-vmoe.yaml"


def overrides(digits: Path) -> list[str]:
    settings = {"batch_size": 32, "steps": 6, "checkpoint_every": 3, "log_every": 3, "warmup_steps": 2}
    return [f"data.shards={digits}"] + [f"train.{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def trained(digits: Path, tmp_path_factory) -> Path:
    """A run of 6 steps with checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("safe") / "run"
    result = CliRunner().invoke(main, ["pretrain", str(RECIPE), "--out", str(run), *cli_sets(digits)])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run to tamper with."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


def cli_sets(digits: Path) -> list[str]:
    return sum((["--set", s] for s in overrides(digits)), [])


def resume(run: Path, digits: Path) -> tuple[int, str]:
    """`vmoe pretrain --resume latest` of `run`: its exit code and its one error line (or '')."""
    result = CliRunner().invoke(
        main, ["pretrain", str(RECIPE), "--out", str(run), "--resume", "latest"] + cli_sets(digits)
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) <= 1, result.stderr
    return result.exit_code, errors[0] if errors else ""


def digest(checkpoint: Path) -> str:
    tensors = load_file(checkpoint / "model.safetensors")
    return hashlib.sha256(b"".join(n.encode() + tensors[n].numpy().tobytes() for n in sorted(tensors))).hexdigest()


def rewind_to_step_3(run: Path) -> Path:
    """Drop the run's last checkpoint so that `--resume latest` continues from step 3 to step 6."""
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "checkpoints" / "last").write_text("step_00000003\n")
    return run / "checkpoints" / "step_00000003"


def as_legacy(ckpt: Path) -> None:
    """Rewrite a checkpoint's training state as vmoe wrote it before: one torch.save pickle, numpy's RNG keys an
    ndarray."""
    state = load_train_state(ckpt)
    name, keys, *rest = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
    torch.save(state, ckpt / "train_state.pt")
    (ckpt / "train_state.json").unlink()
    (ckpt / "train_state.safetensors").unlink()


class RunsCode:
    """What a crafted pickle holds: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_training_state_is_json_and_safetensors_and_round_trips_exactly(tmp_path):
    recipe = load_recipe(RECIPE)
    state = {
        "step": 7,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).to(torch.bfloat16)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "foreach": None, "params": [0]}],
        },
        "rng": {"python": (3, (1, 2**32 - 1, 5), None), "torch": torch.get_rng_state()},
        "floats": [1 / 3, float("inf"), -0.0, 1e-300],
        "looks_tagged": {"__tuple__": [1, 2]},
        "named": {"blocks.0.mlp": {"step": torch.tensor(1.0)}},
    }
    ckpt = save_checkpoint(tmp_path, 7, {"w": torch.zeros(1)}, recipe, state, keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.yaml", "model.safetensors", "train_state.json", "train_state.safetensors"
    ]  # fmt: skip
    again = load_train_state(ckpt)
    assert repr(again) == repr(state)  # the same types: tuples, int keys, None, floats to the last bit
    assert again["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(again["rng"]["torch"], state["rng"]["torch"])
    assert json.loads((ckpt / "train_state.json").read_text())["format"] == "vmoe-train-state-1"


@pytest.mark.parametrize("legacy", [False, True], ids=["json", "legacy-pt"])
def test_resume_from_either_format_ends_bit_identical(trained, run, digits, legacy):
    ckpt = rewind_to_step_3(run)
    if legacy:
        as_legacy(ckpt)
    assert resume(run, digits) == (0, "")
    final = "checkpoints/step_00000006"
    assert digest(run / final) == digest(trained / final)


@pytest.mark.parametrize("pickler", ["pickle", "torch.save"])
def test_a_crafted_pickle_runs_no_code_and_is_one_line(run, digits, tmp_path, pickler):
    ckpt = find_resume(run, "latest")
    for name in ("train_state.json", "train_state.safetensors"):
        (ckpt / name).unlink(missing_ok=True)  # (missing_ok: this test also runs on the old layout, to fail there)
    marker = tmp_path / "code-ran"
    payload = {"step": RunsCode(marker)}
    if pickler == "pickle":
        (ckpt / "train_state.pt").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ckpt / "train_state.pt")
    code, error = resume(run, digits)
    assert not marker.exists(), "unpickling ran the payload"
    assert code == 2 and f"{ckpt / 'train_state.pt'}: an older vmoe's training state" in error
    assert f"vmoe finetune RECIPE --from {ckpt}" in error


@pytest.mark.parametrize(
    "content",
    ["/tmp", "../../other/checkpoints/step_00000003", "step_00000003/../step_00000006", "", "step_x"],
)
def test_last_may_only_name_a_checkpoint_of_its_own_folder(run, tmp_path, content):
    other = Path(shutil.copytree(run, tmp_path / "other"))
    assert (run / "checkpoints" / content).is_dir() or content in ("", "step_x")
    (run / "checkpoints" / "last").write_text(content + "\n")
    with pytest.raises(VmoeError, match="not a step_XXXXXXXX directory of its own folder") as info:
        find_resume(run, "latest")
    assert str(info.value).startswith(f"{run / 'checkpoints' / 'last'} names {content!r}")
    assert find_resume(run, str(other / "checkpoints" / "step_00000003")).parent.parent == other  # explicit: yours


def test_last_naming_a_symlink_out_of_the_run_is_refused(run, tmp_path, digits):
    outside = Path(shutil.copytree(run / "checkpoints" / "step_00000006", tmp_path / "elsewhere"))
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "checkpoints" / "step_00000006").symlink_to(outside)
    code, error = resume(run, digits)
    assert code == 2 and "names 'step_00000006', not a step_XXXXXXXX directory of its own folder" in error


def test_checkpoint_names_that_are_symlinks_are_unlinked_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    for name in ("step_00000001", ".tmp-step_00000002", "step_00000002"):  # pruned, left by a crash, rewritten
        (root / name).symlink_to(outside)
    save_checkpoint(tmp_path / "run", 2, {"w": torch.zeros(1)}, load_recipe(RECIPE), {}, keep_last=1)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (
        sorted(p.name for p in root.iterdir()) == ["last", "step_00000002"]
        and not (root / "step_00000002").is_symlink()
    )


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def set_json(ckpt: Path, change) -> None:
    file = ckpt / "train_state.json"
    record = json.loads(file.read_text())
    change(record)
    file.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        (lambda c: truncate(c / "train_state.json"), "train_state.json", "cannot read the training state"),
        (lambda c: truncate(c / "train_state.safetensors"), "train_state.safetensors", "cannot read the training"),
        (lambda c: set_json(c, lambda r: r.update(format="other")), "train_state.json", "not a training state"),
        (
            lambda c: set_json(c, lambda r: r["state"]["rng"].update(torch={"__tensor__": "gone"})),
            "train_state.json",
            "damaged training state (KeyError: 'gone')",
        ),
        (lambda c: set_json(c, lambda r: r["state"].pop("epoch")), "", "lacks or mistypes the fields vmoe writes"),
        (lambda c: set_json(c, lambda r: r["state"].update(step="3")), "", "lacks or mistypes the fields vmoe writes"),
        (
            lambda c: set_json(c, lambda r: r["state"]["rng"].update(python=[3, [1, 2], None])),
            "",
            "random-generator states are damaged",
        ),
        (lambda c: (as_legacy(c), truncate(c / "train_state.pt")), "train_state.pt", "an older vmoe's training"),
    ],
    ids=["json-cut", "tensors-cut", "format", "tensor-name", "field", "type", "rng", "legacy-cut"],
)
def test_a_damaged_training_state_is_one_line_naming_the_file(run, damage, file, message):
    ckpt = find_resume(run, "latest")
    damage(ckpt)
    with pytest.raises(VmoeError) as info:
        TrainState.load(ckpt)
    line = str(info.value)
    assert "\n" not in line and line.startswith(str(ckpt / file) if file else f"{ckpt}: ") and message in line


def test_a_converted_checkpoint_is_not_resumable(tmp_path):
    recipe = load_recipe(RECIPE)
    ckpt = save_checkpoint(tmp_path, 0, {"w": torch.zeros(1)}, recipe, {"converted_from": "x"}, keep_last=1)
    with pytest.raises(VmoeError, match=f"written by `vmoe convert-jax`.*vmoe finetune RECIPE --from {ckpt}"):
        TrainState.load(ckpt)
