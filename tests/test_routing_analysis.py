"""vmoe routing: counts agree with the routers' own metrics, shares and NMI are right, a crafted router gives the
expected patch maps, the CLI writes summary.json and every file it lists, and bad input is one line."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import normalized_mutual_info_score

from vmoe_cli.checkpoint import save_checkpoint
from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data.config import DataConfig
from vmoe_cli.data.loader import build_loader
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.eval.routing_analysis import (
    SUMMARY,
    RoutingOptions,
    analyse_routing,
    count_batch,
    layer_summary,
    normalised_mutual_information,
    row_shares,
)
from vmoe_cli.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
PER_IMAGE = ("model.moe.router=per_image", "model.moe.k=1", "model.moe.superclasses=[0,0,1,1,2,2,3,3,0,1]")


def random_model(recipe_name: str, overrides: tuple[str, ...] = ()) -> tuple[VisionTransformer, object]:
    """A digits model with varied (random, non-zero) router weights, in evaluation mode, and its recipe."""
    recipe = load_recipe(ROOT / "recipes" / recipe_name, overrides)
    torch.manual_seed(0)
    model = VisionTransformer(recipe.model).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)
    return model, recipe


def save_run(run: Path, model: VisionTransformer, recipe: object) -> Path:
    save_checkpoint(run, 1, model.state_dict(), recipe, {}, keep_last=1)
    return run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    eval_shards("digits", cache)
    return cache


@pytest.fixture(scope="module")
def batch(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """64 test digits, as the analysis reads them."""
    loader = build_loader(eval_shards("digits", cache), "test", DataConfig(mean=0.25, std=0.35), batch_size=64,
                          image_size=8, channels=1, train=False)  # fmt: skip
    return next(iter(loader))


@pytest.fixture(scope="module")
def analysed(cache, tmp_path_factory) -> tuple[Path, dict]:
    """`vmoe routing` on a random digits V-MoE run, default --out, the first 128 test images."""
    run = save_run(tmp_path_factory.mktemp("vmoe"), *random_model("digits-vmoe.yaml"))
    args = ["routing", str(run), "digits", "--images", "128", "--cache-dir", str(cache)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return run / "routing", json.loads((run / "routing" / SUMMARY).read_text())


@pytest.mark.parametrize(
    "overrides",
    [("model.moe.capacity_factor=0.5",), ("model.moe.router=expert_choice", "model.moe.capacity_factor=0.5"),
     ("model.moe.router=sinkhorn_token_choice", "model.moe.capacity_factor=0.75"),
     ("model.moe.bpr=true", "model.moe.capacity_factor=0.5"), (*PER_IMAGE, "model.moe.capacity_factor=0.5", "model.moe.dropless=false")],  # noqa: E501
)  # fmt: skip
def test_counts_agree_with_the_routers_own_metrics(overrides, batch):
    model, recipe = random_model("digits-vmoe.yaml", overrides)
    images, labels = batch
    counts = count_batch(model, images, labels, 10)
    with torch.no_grad():
        routing = model(images).routing
    assert set(counts["layers"]) == set(routing) == {1, 3}
    k = recipe.model.moe.k
    for block, route in routing.items():
        metrics, layer = route.metrics, layer_summary(counts["layers"][block], k)
        assert layer["tokens"] == 64 * 17
        assert layer["dropped_all"] == pytest.approx(float(metrics["dropped_all"]), abs=1e-6)
        assert layer["dropped_any"] == pytest.approx(float(metrics["dropped_any"]), abs=1e-6)
        assert layer["load"] == pytest.approx(metrics["expert_load"].tolist(), abs=1e-6)
        if "tokens_1_expert" in metrics:  # expert choice
            assert layer["experts_per_token"]["1"] == pytest.approx(float(metrics["tokens_1_expert"]), abs=1e-6)
            assert layer["experts_per_token"]["2+"] == pytest.approx(float(metrics["tokens_2plus_experts"]), abs=1e-6)
        else:  # token choice: every token asked for K experts; rank 1 is never dropped more often than rank K
            assert sum(counts["layers"][block]["requested"]) == 64 * 17 * k
            assert layer["dropped_by_rank"][0] <= layer["dropped_by_rank"][-1]
        assert 0 <= layer["dropped_all"] <= layer["dropped_any"] and 0 < layer["dropped_any"] < 1  # drops some


def test_class_expert_shares_sum_to_one_and_nmi_matches_scikit_learn(analysed):
    out, summary = analysed
    assert summary["images"] == 128
    counts_per_class = None
    for layer in summary["layers"].values():
        shares = np.array(layer["class_expert_share"])
        seen = np.array(layer["class_tokens"]) > 0
        assert np.allclose(shares[seen].sum(axis=1), 1) and (shares[~seen] == 0).all()
        counts_per_class = np.array(layer["class_tokens"])
        # back to counts, then to per-token labels, for scikit-learn
        counts = np.rint(shares * counts_per_class[:, None]).astype(int)
        classes, experts = np.nonzero(counts)
        label_true = np.repeat(classes, counts[classes, experts])
        label_expert = np.repeat(experts, counts[classes, experts])
        assert layer["specialisation_nmi"] == pytest.approx(normalized_mutual_info_score(label_true, label_expert))
    assert counts_per_class.sum() == 128 * 17  # every token of every analysed image, CLS included


def test_nmi_is_one_for_experts_that_split_the_classes_and_zero_for_independent_ones():
    assert normalised_mutual_information(np.array([[5, 0], [0, 7], [3, 0]])) == pytest.approx(
        normalized_mutual_info_score([0] * 5 + [1] * 7 + [2] * 3, [0] * 5 + [1] * 7 + [0] * 3)
    )
    assert normalised_mutual_information(np.array([[6, 0], [0, 6]])) == pytest.approx(1.0)
    assert normalised_mutual_information(np.array([[2, 4], [3, 6]])) == pytest.approx(0.0, abs=1e-12)
    assert row_shares(np.array([[1, 3], [0, 0]])).tolist() == [[0.25, 0.75], [0, 0]]


def test_cli_writes_the_summary_and_every_file_it_lists(analysed):
    out, summary = analysed
    assert {"figures", "layers", "checkpoint", "split", "images"} <= summary.keys() and summary["split"] == "test"
    files = [f["file"] for f in summary["figures"]]
    assert files == ["load.png", "drops.png", "experts-per-token.png", "classes.png", "patches.png", "bpr-patches.png"]
    for figure in summary["figures"]:
        assert (out / figure["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure["title"] and figure["caption"].endswith(".") and figure["caption"].count(". ") == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "load.csv",
        "drops.csv",
        "classes.csv",
        "specialisation.csv",
        "experts-per-token.csv",
        "patches.csv",
    } <= names
    assert all(p.is_file() for p in out.iterdir())  # no subfolders
    assert not [n for n in names if n.endswith(".tmp")]
    drops = (out / "drops.csv").read_text().splitlines()
    assert drops[0] == "block,choice,dropped" and len(drops) == 1 + 2 * (2 + 2)  # choices 1, 2, all, any per block


def crafted_model() -> tuple[VisionTransformer, object]:
    """Every block adds nothing to its input (attention and MLP outputs zeroed), images add nothing (a zero patch
    embedding), so each block's router sees LayerNorm(position embedding); token t's embedding points along
    dimension t % 4 and router row e along dimension e, so token t's first choice is expert t % 4."""
    model, recipe = random_model("digits-vmoe.yaml")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
            mlp = block.mlp
            for p in (mlp.experts.w2, mlp.experts.b2) if hasattr(mlp, "experts") else (mlp.fc2.weight, mlp.fc2.bias):
                p.zero_()
            if hasattr(mlp, "router"):
                mlp.router.proj.weight.copy_(torch.eye(4, 64))
        model.patch_embed.weight.zero_()
        model.patch_embed.bias.zero_()
        model.pos_embed.copy_(10 * torch.eye(64)[torch.arange(17) % 4].unsqueeze(0))
    return model, recipe


def test_a_crafted_router_gives_the_expected_maps(cache, tmp_path):
    run = save_run(tmp_path / "run", *crafted_model())
    options = RoutingOptions(images=64, k=1, capacity_factor=4.0)  # C = 136: nothing dropped
    summary = analyse_routing(run, "digits", tmp_path / "out", options, cache_dir=cache)
    expected = ((np.arange(16) + 1) % 4).reshape(4, 4)  # patch i is token i + 1 (CLS is token 0)
    rows = (tmp_path / "out" / "patches.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = [dict(zip(header, line.split(","), strict=True)) for line in rows[1:]]
    assert len(cells) == 8 * 2 * 16  # 8 images (one per class), 2 MoE blocks, 16 patches
    for cell in cells:
        assert int(cell["first_expert"]) == expected[int(cell["row"]), int(cell["col"])] and cell["kept"] == "true"
    for layer in summary["layers"].values():  # position decides, the class does not
        assert np.allclose(layer["class_expert_share"], [[5 / 17, 4 / 17, 4 / 17, 4 / 17]] * 10)
        assert layer["specialisation_nmi"] == pytest.approx(0, abs=1e-9) and layer["dropped_all"] == 0
    # At K=1, cf 0.5 the 8 images (136 tokens, one group) get C = ceil(136 * 0.5 / 4) = 17 -> 20 (multiple of 4)
    # slots per expert; vanilla routing keeps each expert's first 20 tokens in group order.
    seen = [0] * 4
    kept_vanilla = {}
    for token in range(8 * 17):
        expert = token % 17 % 4
        kept_vanilla[token // 17, token % 17] = seen[expert] < 20
        seen[expert] += 1
    for cell in cells:
        token = 1 + 4 * int(cell["row"]) + int(cell["col"])
        assert (cell["kept_k1_cf0.5_vanilla"] == "true") == kept_vanilla[int(cell["image"]), token]


def test_soft_moe_dispatch_entropy_per_slot(cache, batch, tmp_path):
    model, recipe = random_model("digits-vmoe.yaml", ("model.moe.router=soft",))
    with torch.no_grad():
        for block in (model.blocks[1], model.blocks[3]):
            block.mlp.phi.zero_()  # every slot weighs the image's 17 tokens equally
    layer = layer_summary(count_batch(model, *batch, 10)["layers"][1], 2)
    assert np.allclose(layer["slot_entropy_nats"], math.log(17)) and np.allclose(layer["slot_effective_tokens"], 17)
    random_soft, _ = random_model("digits-vmoe.yaml", ("model.moe.router=soft",))
    summary = analyse_routing(save_run(tmp_path / "run", random_soft, recipe), "digits", tmp_path / "out",
                              RoutingOptions(images=32), cache_dir=cache)  # fmt: skip
    assert [f["file"] for f in summary["figures"]] == ["soft-entropy.png"]
    assert 1 <= summary["layers"]["3"]["effective_tokens_mean"] <= 17
    assert (tmp_path / "out" / "soft-entropy.csv").is_file()


def test_dropless_override_drops_nothing_where_capacity_drops(cache, tmp_path):
    model, recipe = random_model("digits-vmoe.yaml")
    run = save_run(tmp_path / "run", model, recipe)
    tight = RoutingOptions(images=64, capacity_factor=0.5)
    capacity = analyse_routing(run, "digits", tmp_path / "capacity", tight, cache_dir=cache)
    dropless = analyse_routing(run, "digits", tmp_path / "dropless", replace(tight, dropless=True), cache_dir=cache)
    assert not capacity["routing"]["dropless"] and dropless["routing"]["dropless"]
    for block, layer in dropless["layers"].items():
        assert capacity["layers"][block]["dropped_any"] > 0  # the same setting with capacity drops some
        assert layer["dropped_any"] == 0 and layer["dropped_all"] == 0


def test_per_image_routing_by_class_and_super_class(cache, batch, tmp_path):
    model, recipe = random_model("digits-vmoe.yaml", PER_IMAGE)
    run = save_run(tmp_path / "run", model, recipe)
    summary = analyse_routing(run, "digits", tmp_path / "out", RoutingOptions(images=64), cache_dir=cache)
    images, labels = batch
    with torch.no_grad():
        chosen = model(images).image_logits_BE.argmax(dim=-1)
    direct = np.zeros((10, 4), dtype=int)
    np.add.at(direct, (labels.numpy(), chosen.numpy()), 1)
    info = summary["per_image"]
    assert info["class_expert_images"] == direct.tolist()
    groups = np.array(info["superclasses"])
    assert info["images_to_superclass_expert"] == pytest.approx((groups[labels.numpy()] == chosen.numpy()).mean())
    assert "per-image.png" in [f["file"] for f in summary["figures"]]
    assert "classes.png" not in [f["file"] for f in summary["figures"]]  # the same decision in every layer


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("none", [], "not a checkpoint"),
        ("dense", [], "a dense model has no MoE layers to analyse"),
        ("vmoe", ["--k", "5"], "--k 5: the model has only 4 experts"),
        ("vmoe", ["--split", "minival"], "no split 'minival'"),
        ("vmoe", ["--images", "0"], "--images 0: give at least 1 image"),
        ("expert_choice", ["--bpr"], "--bpr: the expert_choice router has no such setting"),
        ("expert_choice", ["--dropless"], "--dropless: the expert_choice router drops no token's choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(make, extra, message, cache, tmp_path):
    run = tmp_path / "run"
    if make == "dense":
        save_run(run, *random_model("digits-vit.yaml"))
    elif make == "vmoe":
        save_run(run, *random_model("digits-vmoe.yaml"))
    elif make == "expert_choice":
        save_run(run, *random_model("digits-vmoe.yaml", ("model.moe.router=expert_choice",)))
    else:
        run.mkdir()
    result = CliRunner().invoke(main, ["routing", str(run), "digits", "--cache-dir", str(cache), *extra])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_heatmap_cells_show_shares_that_round_to_one_as_one():
    from vmoe_cli.eval.plots import pyplot
    from vmoe_cli.eval.routing_plots import _heatmap

    fig, ax = pyplot().subplots()
    _heatmap(ax, np.array([[0.9996, 0.42, 0.0]]), 1.0)
    assert [t.get_text() for t in ax.texts] == ["1.00", ".42", ".00"]
    pyplot().close(fig)
