"""fewshot: the closed-form ridge against direct solves, nested sampling, L2 chosen without the test split,
the feature cache and its invalidation, the CLI's table, JSON and CSV, and one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits

from vmoe_cli.checkpoint import save_checkpoint
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data.augment import eval_view
from vmoe_cli.data.manifest import file_sha256, read_manifest
from vmoe_cli.data.shard import ShardOptions, eval_shards, write_shards
from vmoe_cli.data.sources import open_source
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.fewshot import load_backbone
from vmoe_cli.eval.opening import Preprocess
from vmoe_cli.eval.probe import (
    BIAS,
    FEATURES_VERSION,
    L2_GRID,
    Backbone,
    Features,
    Ridge,
    dataset_features,
    probe,
    sample_indices,
)
from vmoe_cli.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pixels() -> Features:
    """Raw pixels of scikit-learn's digits as known features: first 1,300 train, the rest test."""
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    return Features(x[:1300], y[:1300], x[1300:], y[1300:], 10, 0.0, False)


def direct_solve(train_x: np.ndarray, train_y: np.ndarray, l2: float) -> np.ndarray:
    """The same ridge system written out and solved by numpy.linalg.solve."""
    z = (train_x - train_x.mean(0)) / (train_x.std(0) + 1e-5)
    X = np.concatenate([z, np.full((len(z), 1), BIAS)], axis=1).astype(np.float64)
    Y = 2.0 * np.eye(10)[train_y] - 1.0
    return np.linalg.solve(X.T @ X + l2 * np.eye(X.shape[1]), X.T @ Y)


@pytest.mark.parametrize("n", [40, 250])  # 40 samples < 65 columns: dual; 250: primal
def test_ridge_equals_direct_solve_for_every_l2(pixels, n):
    x, y = pixels.train_x[:n], pixels.train_y[:n]
    ridge = Ridge(x, y, 10)
    assert ridge.dual == (n < len(ridge.used))
    for l2 in L2_GRID:
        expected = direct_solve(x, y, l2)
        np.testing.assert_allclose(
            ridge.weights(l2), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
        )  # cond ~1e9 at 2^-10


def test_primal_and_dual_give_the_same_scores(pixels):
    x, y = pixels.train_x[:100], pixels.train_y[:100]
    primal, dual = Ridge(x, y, 10, dual=False), Ridge(x, y, 10, dual=True)
    a, b = primal.scores(pixels.test_x, L2_GRID), dual.scores(pixels.test_x, L2_GRID)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8 * np.abs(a).max())
    w = primal.weights(8.0)
    z = (pixels.test_x - x.mean(0)) / (x.std(0) + 1e-5)
    design = np.concatenate([z, np.full((len(z), 1), BIAS)], axis=1)
    np.testing.assert_allclose(primal.scores(pixels.test_x, [8.0])[0], design @ w, rtol=1e-5, atol=1e-5)


def test_sampling_is_nested_per_class_seeded_and_disjoint_from_validation(pixels):
    y = pixels.train_y
    train, val = sample_indices(y, 10, [1, 5, 10, 25], seed=3, val_per_class=7)
    for s in (1, 5, 10, 25):
        assert np.bincount(y[train[s]], minlength=10).tolist() == [s] * 10
    assert set(train[1]) < set(train[5]) < set(train[10]) < set(train[25])
    assert np.bincount(y[val], minlength=10).tolist() == [7] * 10
    assert not set(val) & set(train[25])
    again, _ = sample_indices(y, 10, [1, 5, 10, 25], seed=3, val_per_class=7)
    other, _ = sample_indices(y, 10, [1, 5, 10, 25], seed=4, val_per_class=7)
    assert np.array_equal(train[25], again[25]) and not np.array_equal(train[25], other[25])
    smaller, _ = sample_indices(y, 10, [1, 5], seed=3, val_per_class=7)
    assert np.array_equal(smaller[5], train[5])  # the shots asked do not change a shot count's examples


def test_test_split_never_influences_the_chosen_l2(pixels):
    rows = probe(pixels, [1, 5, 25], seeds=2)
    rng = np.random.default_rng(0)
    scrambled = Features(
        pixels.train_x, pixels.train_y, rng.normal(size=pixels.test_x.shape).astype(np.float32),
        rng.permutation(pixels.test_y), 10, 0.0, False,
    )  # fmt: skip
    scrambled_rows = probe(scrambled, [1, 5, 25], seeds=2)
    assert [r["l2"] for r in rows] == [r["l2"] for r in scrambled_rows]
    assert [r["accuracy"] for r in rows] != [r["accuracy"] for r in scrambled_rows]
    assert {r["l2"] for r in rows} <= set(L2_GRID)
    by_shots = {s: np.mean([r["accuracy"] for r in rows if r["shots"] == s]) for s in (1, 5, 25)}
    assert 0.4 < by_shots[1] < by_shots[5] < by_shots[25] and by_shots[25] > 0.85  # raw digits pixels


def test_fixed_l2_and_logistic_probe(pixels):
    fixed = probe(pixels, [10], seeds=1, l2=1024.0)
    assert fixed[0]["l2"] == 1024.0 and fixed[0]["val_accuracy"] is None
    logistic = probe(pixels, [10], seeds=1, kind="logistic")
    assert logistic[0]["accuracy"] > 0.75


def test_too_few_examples_for_the_shots_is_one_clear_error(pixels):
    with pytest.raises(VmoeError, match="class 0 has .* fewer than the 500 shots"):
        probe(pixels, [500], seeds=1)


def test_eval_shards_holds_out_a_test_split_once(tmp_path):
    out = eval_shards("digits", tmp_path)
    splits = read_manifest(out)["splits"]
    assert splits["test"]["count"] == round(0.2 * 1797) and splits["train"]["count"] == 1797 - 359
    assert eval_shards("digits", tmp_path) == out  # the same key: sharded once
    assert eval_shards(str(out), tmp_path / "other") == out  # shards are used as they are


def test_shard_test_hold_out_is_refused_when_the_source_has_a_test_split(tmp_path):
    fake = tmp_path / "src"
    for split in ("train", "test"):
        (fake / split / "a").mkdir(parents=True)
        from PIL import Image

        Image.new("L", (4, 4), 7).save(fake / split / "a" / "x.png")
    with pytest.raises(VmoeError, match="has its own test split"):
        write_shards(open_source(str(fake)), tmp_path / "out", ShardOptions(test=0.2))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained digits V-MoE saved as a checkpoint (features of random weights are still features)."""
    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe(ROOT / "recipes" / "digits-vmoe.yaml")
    torch.manual_seed(0)
    save_checkpoint(run, 1, VisionTransformer(recipe.model).state_dict(), recipe, {}, keep_last=5)
    return run


def test_features_are_cached_and_invalidated_when_the_checkpoint_changes(tiny_checkpoint, tmp_path):
    first = dataset_features(load_backbone(str(tiny_checkpoint)), "digits", tmp_path)
    again = dataset_features(load_backbone(str(tiny_checkpoint)), "digits", tmp_path)
    assert not first.cached and again.cached and np.array_equal(first.test_x, again.test_x)
    assert first.train_x.shape == (1438, 64) and first.test_x.shape == (359, 64)

    other_routing = dataset_features(load_backbone(str(tiny_checkpoint), k=1), "digits", tmp_path)
    assert not other_routing.cached

    recipe = load_recipe(tiny_checkpoint / "checkpoints" / "step_00000001" / "config.yaml")
    model = VisionTransformer(recipe.model)
    with torch.no_grad():
        model.patch_embed.weight.mul_(2.0)
    save_checkpoint(
        tiny_checkpoint, 2, model.state_dict(), recipe, {}, keep_last=5
    )  # the run's newest checkpoint changes
    changed = dataset_features(load_backbone(str(tiny_checkpoint)), "digits", tmp_path)
    assert not changed.cached and not np.allclose(changed.test_x, first.test_x)


def test_fewshot_cli_writes_table_json_and_csv(tiny_checkpoint, tmp_path):
    out = tmp_path / "res" / "fewshot.json"
    args = ["fewshot", "--checkpoint", "pixels", "digits", "--shots", "1,5", "--seeds", "2", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "cache"), "--pixels-size", "8"])
    assert result.exit_code == 0, result.output
    assert "5-shot" in result.output and "digits" in result.output
    results = json.loads(out.read_text())
    info = results["datasets"]["digits"]
    assert info["features"] == 64 and info["test"] == 359 and len(info["rows"]) == 4
    assert set(info["summary"]) == {"1", "5"}
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["shots"], r["seed"]) for r in rows] == [("1", "0"), ("5", "0"), ("1", "1"), ("5", "1")]
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["l2"]) in L2_GRID for r in rows)


@pytest.mark.parametrize(
    ("checkpoint", "extra", "message"),
    [
        ("pixels", ["--shots", "1,x"], "--shots: expected comma-separated integers"),
        ("pixels", ["--l2", "-3"], "--l2: expected 'grid' or a positive number"),
        ("nope", [], "--checkpoint nope: not a checkpoint"),
        ("pixels", ["--shots", "400"], "fewer than the 400 shots asked"),
    ],
)
def test_fewshot_cli_errors_are_one_line(tmp_path, monkeypatch, checkpoint, extra, message):
    monkeypatch.chdir(tmp_path)
    args = ["fewshot", "--checkpoint", checkpoint, "digits", "--cache-dir", str(tmp_path), "--pixels-size", "8"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2
    *progress, error = result.output.splitlines()  # an error found after extraction follows its progress lines
    assert error.startswith("error: ") and message in error and all(line.startswith("features ") for line in progress)


@pytest.fixture(scope="module")
def digits_eval(tmp_path_factory) -> str:
    """The digits as evaluation shards (train and test), sharded once; each test gets its own feature cache."""
    return str(eval_shards("digits", tmp_path_factory.mktemp("eval")))


def damage(file: Path, how: str) -> None:
    """Damage a feature cache entry the ways a disk, a kill or a person can."""
    if how == "cut":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif how == "garbage":
        file.write_bytes(b"not an npz file\n" * 10)
    else:
        with np.load(file) as z:
            arrays = {name: z[name] for name in z.files}
        if how == "missing array":
            del arrays["test_y"]
        elif how == "a label short":
            arrays["train_y"] = arrays["train_y"][:-1]
        else:  # "float64 features"
            arrays["test_x"] = arrays["test_x"].astype(np.float64)
        np.savez(file, **arrays)


@pytest.mark.parametrize("how", ["cut", "garbage", "missing array", "a label short", "float64 features"])
def test_a_damaged_cache_entry_is_removed_and_rebuilt_with_a_warning(digits_eval, tmp_path, capsys, how):
    backbone = load_backbone("pixels", pixels_size=8)
    first = dataset_features(backbone, digits_eval, tmp_path)
    [file] = (tmp_path / "features").glob("*.npz")
    damage(file, how)
    capsys.readouterr()
    rebuilt = dataset_features(backbone, digits_eval, tmp_path)
    assert capsys.readouterr().err == f"warning: cache entry {file} unreadable: rebuilt\n"
    assert not rebuilt.cached and np.array_equal(rebuilt.train_y, first.train_y)
    assert np.array_equal(rebuilt.test_x, first.test_x) and rebuilt.test_x.dtype == np.float32
    again = dataset_features(backbone, digits_eval, tmp_path)
    assert again.cached and np.array_equal(again.test_x, first.test_x) and capsys.readouterr().err == ""


def test_a_routed_models_features_are_cached_per_batch_size(tmp_path_factory, digits_eval, tmp_path):
    """Routing groups of a whole batch with binding capacity: which tokens keep their slots depends on the
    batch, so features at batch 64 and 256 differ and neither may stand in for the other."""
    run = tmp_path_factory.mktemp("grouped")
    overrides = ("model.moe.group_images=256", "model.moe.capacity_factor=0.5")
    recipe = load_recipe(ROOT / "recipes" / "digits-vmoe.yaml", overrides)
    torch.manual_seed(0)
    model = VisionTransformer(recipe.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)  # varied gates, so the capacity binds on different tokens
    save_checkpoint(run, 1, model.state_dict(), recipe, {}, keep_last=1)
    small = dataset_features(load_backbone(str(run)), digits_eval, tmp_path, batch_size=64)
    large = dataset_features(load_backbone(str(run)), digits_eval, tmp_path, batch_size=256)
    assert not small.cached and not large.cached and len(list((tmp_path / "features").glob("*.npz"))) == 2
    assert np.abs(small.test_x - large.test_x).max() > 1e-2
    again = dataset_features(load_backbone(str(run)), digits_eval, tmp_path, batch_size=64)
    assert again.cached and np.array_equal(again.test_x, small.test_x)
    pixels = load_backbone("pixels", pixels_size=8)  # no routing: one entry serves every batch size
    dataset_features(pixels, digits_eval, tmp_path, batch_size=64)
    assert dataset_features(pixels, digits_eval, tmp_path, batch_size=256).cached


def test_a_checkpoints_eval_crop_reaches_its_features_in_their_own_cache_entry(
    tiny_checkpoint, digits_eval, tmp_path_factory, tmp_path
):
    """data.eval_crop_pct is read from a checkpoint's recipe (absent: squash, as before), and evaluation reads the
    images centre-cropped; the features get their own cache entry, the squashed ones keep their old key."""
    run = tmp_path_factory.mktemp("crop")
    recipe = load_recipe(ROOT / "recipes" / "digits-vit.yaml", ["data.eval_crop_pct=0.5"])
    save_checkpoint(run, 1, VisionTransformer(recipe.model).state_dict(), recipe, {}, keep_last=1)
    assert load_backbone(str(run)).preprocess.crop_pct == 0.5
    assert load_backbone(str(tiny_checkpoint)).preprocess.crop_pct is None

    squash = Preprocess(8, 1, 0.0, 1.0)  # features = the pixels / 255
    squashed = dataset_features(Backbone("pixels", "raw", None, squash), digits_eval, tmp_path)
    crop = dataclasses.replace(squash, crop_pct=0.5)
    cropped = dataset_features(Backbone("pixels", "raw", None, crop), digits_eval, tmp_path)
    assert not cropped.cached and len(list((tmp_path / "features").glob("*.npz"))) == 2
    digits = np.round(squashed.test_x * 255).astype(np.uint8).reshape(-1, 8, 8)  # 8 x 8 digits: squash is identity
    expected = np.stack([np.asarray(eval_view(Image.fromarray(d), 8, 0.5), np.float32) / 255 for d in digits])
    assert np.allclose(cropped.test_x, expected.reshape(len(digits), 64), atol=1e-6)
    assert not np.allclose(cropped.test_x, squashed.test_x)
    manifest = file_sha256(Path(digits_eval) / "manifest.json")
    identity = [FEATURES_VERSION, "raw", manifest, 8, 1, 0.0, 1.0, None]  # the key before eval_crop_pct existed
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    assert (tmp_path / "features" / f"{key}.npz").is_file()
