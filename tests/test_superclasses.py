"""Super-classes: balanced spectral grouping of a confusion matrix, end to end on the digits' minival slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vmoe_cli.config import load_recipe, read_superclasses
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.manifest import read_manifest
from vmoe_cli.data.shard import ShardOptions, write_shards
from vmoe_cli.data.sources import open_source
from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.superclasses import balanced_groups, find_superclasses, write_superclasses
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [[0, 3, 5, 8], [1, 4, 9], [2, 6, 7]]  # interleaved, so contiguous index ranges cannot pass


def block_confusion(seed: int = 0, blocks: list[list[int]] = BLOCKS) -> np.ndarray:
    """10 classes confused heavily within each block and rarely across blocks."""
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, 2, size=(10, 10))
    for block in blocks:
        confusion[np.ix_(block, block)] = rng.integers(5, 15, size=(len(block), len(block)))
    np.fill_diagonal(confusion, 60)
    return confusion


def test_balanced_groups_recovers_confusion_blocks():
    assert balanced_groups(block_confusion(), 3) == BLOCKS
    assert balanced_groups(block_confusion(seed=1), 3, seed=5) == BLOCKS


def test_balanced_groups_sizes_cover_and_determinism():
    confusion = block_confusion()
    groups = balanced_groups(confusion, 4)
    assert sorted(len(g) for g in groups) == [2, 2, 3, 3]
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert groups == [sorted(g) for g in groups] and [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert balanced_groups(confusion, 4) == groups
    assert balanced_groups(confusion, 1) == [list(range(10))]
    assert balanced_groups(confusion, 10) == [[c] for c in range(10)]
    two_blocks = block_confusion(seed=1, blocks=[[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]])  # nearest centres: 2, 4, 4
    assert sorted(len(g) for g in balanced_groups(two_blocks, 3)) == [3, 3, 4]
    assert sorted(len(g) for g in balanced_groups(two_blocks, 4)) == [2, 2, 3, 3]
    for bad in (0, 11):
        with pytest.raises(VmoeError, match="10 classes"):
            balanced_groups(confusion, bad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Digits shards with minival and test hold-outs, and a dense ViT trained on them for 30 steps."""
    shards, run = tmp_path_factory.mktemp("digits"), tmp_path_factory.mktemp("dense") / "run"
    write_shards(open_source("digits"), shards, ShardOptions(shard_size=300, minival=0.1, test=0.2), workers=1)
    train = {"steps": 30, "eval_every": 0, "log_every": 10, "checkpoint_every": 0, "warmup_steps": 5}
    overrides = [f"data.shards={shards}", "data.eval_split=minival"] + [f"train.{k}={v}" for k, v in train.items()]
    pretrain(load_recipe(ROOT / "recipes" / "digits-vit.yaml", overrides), run)
    return shards, run


def test_find_superclasses_on_minival(trained, tmp_path):
    shards, run = trained
    result = find_superclasses(str(run), str(shards), experts=3, cache_dir=tmp_path)
    splits = read_manifest(shards)["splits"]
    assert result["examples"] == splits["minival"]["count"] != splits["test"]["count"]
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == result["examples"]
    loader = build_loader(shards, "minival", DataConfig(), batch_size=64, image_size=8, channels=1, train=False)
    labels = np.concatenate([y.numpy() for _, y in loader])
    assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()  # rows are true classes
    assert result["heldout_top1"] == pytest.approx(np.trace(confusion) / result["examples"])
    assert result["heldout_top1"] > 0.2  # 10 classes: chance is 0.1
    groups = result["group_indices"]
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert all(result["class_to_group"][c] == i for i, g in enumerate(groups) for c in g)
    assert result["groups"] == [[result["classes"][c] for c in g] for g in groups]
    assert result["split"] == "minival" and result["experts"] == 3


def test_find_superclasses_refuses_test_and_missing_splits(trained, tmp_path):
    shards, run = trained
    with pytest.raises(VmoeError, match="must not see test data"):
        find_superclasses(str(run), str(shards), experts=3, split="test", cache_dir=tmp_path)
    with pytest.raises(VmoeError, match="--minival"):
        find_superclasses(str(run), str(shards), experts=3, split="val", cache_dir=tmp_path)
    with pytest.raises(VmoeError, match="--experts 11"):
        find_superclasses(str(run), str(shards), experts=11, cache_dir=tmp_path)


def test_superclasses_file_round_trip_and_errors(tmp_path):
    groups = balanced_groups(block_confusion(), 3)
    class_to_group = [next(i for i, g in enumerate(groups) if c in g) for c in range(10)]
    path = tmp_path / "nested" / "superclasses.json"
    write_superclasses({"experts": 3, "group_indices": groups, "class_to_group": class_to_group}, path)
    assert json.loads(path.read_text())["group_indices"] == groups
    assert read_superclasses(path, num_classes=10, experts=3) == class_to_group
    assert [p.name for p in path.parent.iterdir()] == ["superclasses.json"]  # no temporary file left

    for num_classes, experts, what in ((11, 3, "11"), (10, 4, "--experts 4"), (10, 2, "--experts 2")):
        with pytest.raises(VmoeError, match=what) as error:
            read_superclasses(path, num_classes, experts)
        assert str(path) in str(error.value)
    bad = tmp_path / "bad.json"
    for text in ('{"class_to_group": [0, 1', '{"groups": []}', '{"class_to_group": [0, 1, 5]}', "[1, 2]"):
        bad.write_text(text)
        with pytest.raises(VmoeError) as error:
            read_superclasses(bad, num_classes=3, experts=3)
        assert str(bad) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(VmoeError, match="missing.json"):
        read_superclasses(tmp_path / "missing.json", num_classes=10, experts=3)
