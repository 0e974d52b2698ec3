"""Dropless execution: every chosen (token, expert) pair computed once, nothing dropped, batch-independent outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_sweep import save_random_model
from test_train import metrics, settings
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vmoe_cli.cli import main
from vmoe_cli.config import load_recipe
from vmoe_cli.data.shard import eval_shards
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ModelConfig, MoEConfig
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]


def model(**moe: object) -> VisionTransformer:
    """A nano V-MoE (17 tokens per image, E=4, MoE in blocks 1 and 3) whose weights are all perturbed, head and
    experts included, so that any change of routing changes the logits."""
    torch.manual_seed(0)
    settings_ = {"layers": "last-2", "num_experts": 4, **moe}
    cfg = ModelConfig(variant="nano/2", image_size=8, channels=1, num_classes=10, moe=MoEConfig(**settings_))
    vit = VisionTransformer(cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return vit


TOKEN_CHOICE = {
    "token choice K=1": {"k": 1},
    "token choice K=2": {"k": 2},
    "token choice K=1 BPR": {"k": 1, "bpr": True},
    "token choice K=2 BPR": {"k": 2, "bpr": True},
    "sinkhorn token choice K=2": {"router": "sinkhorn_token_choice", "k": 2},
    "per image K=1": {"router": "per_image", "k": 1},
    "per image K=2": {"router": "per_image", "k": 2},
}


@pytest.mark.parametrize("name", ["token choice K=1", "token choice K=2 BPR", "per image K=1"])
def test_an_image_gets_the_same_logits_alone_and_inside_a_batch(name):
    """Dropless: a token's output depends on nothing else in the batch. Capacity at a tight factor: it does
    (the other images take the slots), so this test can fail."""
    vit = model(**TOKEN_CHOICE[name], capacity_factor=0.5).eval()
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        vit.set_routing(dropless=True)
        alone, batch = vit(images[:1]).logits, vit(images).logits[:1]
        assert (alone - batch).abs().max() <= 1e-6
        vit.set_routing(dropless=False)
        alone, batch = vit(images[:1]).logits, vit(images).logits[:1]
        assert (alone - batch).abs().max() > 1e-2


def test_per_image_routing_at_inference_is_dropless_unless_capacity_is_asked_for():
    """Batch of one image, capacity factor 1.05: capacity mode drops most of its tokens (C = 8 of 17, all going to
    one expert); the default at inference drops none and costs the dense MLP (one expert) per MoE block."""
    vit = model(router="per_image", k=1, capacity_factor=1.05, capacity_multiple=1).eval()
    image = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        routing = vit(image).routing
        assert all(r.metrics["dropped_all"] == 0 for r in routing.values())
        vit.set_routing(capacity_factor=1.05)  # asking for a capacity asks for capacity execution
        routing = vit(image).routing
        assert all(r.metrics["dropped_all"] > 0.5 for r in routing.values())
    assert vit.cfg.moe.dropless is False and vit.train().cfg.moe.dropless_at(training=True) is False
    # FLOPs of one image: the dense twin's plus the image router's one [D, E] projection
    vit.set_routing(dropless=None)
    dense = VisionTransformer(ModelConfig(variant="nano/2", image_size=8, channels=1, num_classes=10)).eval()
    counts = []
    for m in (vit.eval(), dense):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            m(image)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] + 2 * 64 * 4


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_capacity_and_dropless_agree_when_nothing_is_dropped(name):
    """With ample capacity (C >= S), capacity mode drops nothing: outputs, aux losses and every gradient
    (experts and router) must be those of dropless mode."""
    vit = model(**TOKEN_CHOICE[name], capacity_factor=4.0)  # C = ceil(S * K * 4 / 4) >= S
    images = torch.randn(6, 1, 8, 8)
    results = {}
    for dropless in (False, True):
        vit.set_routing(dropless=dropless)
        vit.zero_grad()
        torch.manual_seed(1)  # the same router noise in training
        out = vit.train()(images)
        (out.logits.square().mean() + out.aux_loss).backward()
        with torch.no_grad():
            logits = vit.eval()(images).logits
        dropped = [float(r.metrics["dropped_any"]) for r in out.routing.values()]
        results[dropless] = (logits, out.aux_loss.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()})
        assert dropped == [0.0, 0.0]
        # dropless has no buffers: its plan's capacity is S = 6 x 17 tokens, the buffers' C is above it
        assert (out.routing[1].plan.capacity == 6 * 17) == dropless
    (logits, aux, grads), (logits_d, aux_d, grads_d) = results[False], results[True]
    torch.testing.assert_close(logits_d, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_d, aux)
    for n, g in grads.items():
        torch.testing.assert_close(grads_d[n], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")
    router = "image_router.proj.weight" if vit.image_router is not None else "blocks.1.mlp.router.proj.weight"
    assert grads_d[router].abs().sum() > 0 and grads_d["blocks.3.mlp.experts.w1"].abs().sum() > 0


def test_dropless_is_refused_where_it_means_nothing():
    for router in ("expert_choice", "sinkhorn_expert_choice", "soft"):
        with pytest.raises(VmoeError, match=f"needs a router whose tokens choose experts.*{router} drops no"):
            MoEConfig(router=router, dropless=True).validate(4)
    recipe = ROOT / "recipes" / "digits-vmoe.yaml"
    with pytest.raises(VmoeError, match="train.expert_parallel=2 exchanges fixed-size expert buffers") as e:
        load_recipe(recipe, ["model.moe.dropless=true", "train.expert_parallel=2"])
    assert "\n" not in str(e.value)
    assert load_recipe(recipe, ["model.moe.dropless=true"]).model.moe.dropless is True


def test_pretrain_dropless_on_digits(digits, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "digits-vmoe.yaml", [*settings(digits, 20), "model.moe.dropless=true"])
    pretrain(recipe, tmp_path / "run")
    records = metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert all(r["moe1/dropped_all"] == r["moe3/dropped_any"] == 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r for r in records if "eval_top1" in r][-1]["eval_top1"] > 0.3  # chance is 0.1


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    eval_shards("digits", cache)
    return cache


def test_sweep_capacity_dropless_adds_one_row_per_k(cache, tmp_path):
    run = save_random_model(tmp_path / "run", "digits-vmoe.yaml", ("model.moe.capacity_factor=0.5",))
    out = tmp_path / "sweep"
    args = ["sweep-capacity", "digits", "--checkpoint", str(run), "--out", str(out), "--dropless", "--bpr", "off"]
    args += ["--k", "1,2", "--capacity", "0.5,4", "--batch-size", "128", "--throughput-batch", "8", "--repeats", "1"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert result.output.count("dropless") >= 2
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["k"], r["capacity_factor"], r["dropless"]) for r in rows] == [
        ("1", "0.5", "false"), ("1", "4", "false"), ("1", "", "true"),
        ("2", "0.5", "false"), ("2", "4", "false"), ("2", "", "true"),
    ]  # fmt: skip
    data = {
        (r["k"], r["dropless"], r["capacity_factor"]): r for r in json.loads((out / "sweep.json").read_text())["rows"]
    }
    for k in (1, 2):
        dropless, ample = data[(k, True, None)], data[(k, False, 4.0)]
        assert dropless["dropped_any"] == 0 and dropless["top1"] == ample["top1"]  # cf 4: C >= S, nothing dropped
        assert data[(k, False, 0.5)]["dropped_any"] > 0
        assert dropless["gflops"] < ample["gflops"]  # K MLPs per token, not E x C slots
    ec = save_random_model(tmp_path / "ec-run", "digits-vmoe.yaml", ("model.moe.router=expert_choice",))
    refused = CliRunner().invoke(
        main, ["sweep-capacity", "digits", "--checkpoint", str(ec), "--dropless", "--cache-dir", str(cache)]
    )
    assert refused.exit_code == 2 and "--dropless: expert_choice drops no token's choice" in refused.output


def test_fewshot_dropless_reaches_the_features(cache, tmp_path):
    """`--dropless` and `--no-dropless` give two feature sets (cached apart): at cf 0.25 capacity mode drops most
    tokens, dropless none."""
    run = save_random_model(tmp_path / "run", "digits-vmoe.yaml", ("model.moe.capacity_factor=0.25",))
    features = {}
    for flag in ("--dropless", "--no-dropless"):
        before = set((cache / "features").glob("*.npz"))
        args = ["fewshot", "digits", "--checkpoint", str(run), flag, "--shots", "5", "--seeds", "1", "--l2", "1024"]
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / f"{flag}.json"), "--cache-dir", str(cache)])
        assert result.exit_code == 0, result.output
        (entry,) = set((cache / "features").glob("*.npz")) - before
        features[flag] = np.load(entry)["test_x"]
    assert np.abs(features["--dropless"] - features["--no-dropless"]).max() > 1e-3
