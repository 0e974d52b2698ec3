"""Per-image routing (Mobile V-MoE): one decision per image, reused by every MoE block, super-class guidance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import metrics, settings

from vmoe_cli.config import load_recipe
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ModelConfig, MoEConfig
from vmoe_cli.models.routing import importance_loss
from vmoe_cli.models.vit import VisionTransformer
from vmoe_cli.train.loop import pretrain
from vmoe_cli.train.losses import superclass_guidance

ROOT = Path(__file__).resolve().parents[1]
SUPER = [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]


def per_image(**moe) -> VisionTransformer:
    torch.manual_seed(0)
    settings_ = {"router": "per_image", "layers": "last-2", "num_experts": 4, "k": 2, "capacity_factor": 4.0}
    cfg = ModelConfig(variant="nano/2", image_size=8, channels=1, num_classes=10, moe=MoEConfig(**{**settings_, **moe}))
    model = VisionTransformer(cfg)
    with torch.no_grad():  # experts differ, so that a wrong expert changes the output
        for block in model.blocks:
            if hasattr(block.mlp, "experts"):
                for p in block.mlp.experts.parameters():
                    p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("moe", [{"k": 1}, {"k": 2}, {"k": 2, "group_size": 10}, {"k": 1, "bpr": True}])
def test_all_tokens_of_an_image_go_to_the_same_experts_in_every_block(moe):
    model = per_image(**moe).eval()
    out = model(torch.randn(6, 1, 8, 8))
    N = model.cfg.tokens_per_image
    plans = [out.routing[i].plan for i in model.cfg.moe_layers()]
    for plan in plans:
        experts_BNK = plan.expert_GSK.reshape(6, N, -1)
        weights_BNK = plan.weight_GSK.reshape(6, N, -1)
        assert (experts_BNK == experts_BNK[:, :1]).all() and (weights_BNK == weights_BNK[:, :1]).all()
        assert plan.kept_GSK.all()  # capacity factor 4: nothing dropped
    assert torch.equal(plans[0].expert_GSK, plans[1].expert_GSK)  # one decision, reused
    # the decision is the top-K of the image router on the mean token before the first MoE block
    x_BND = model.run_blocks(model.embed(torch.randn(6, 1, 8, 8)), 0, model.cfg.moe_layers()[0]).x_BND
    logits_BE, _ = model.image_router(x_BND)
    expected = logits_BE.softmax(-1).topk(moe["k"], dim=-1).indices
    routing = model.run_blocks(x_BND, model.cfg.moe_layers()[0]).routing
    first = routing[model.cfg.moe_layers()[0]].plan.expert_GSK.reshape(6, N, -1)[:, 0]
    assert torch.equal(first, expected)


def test_block_output_is_the_gate_weighted_sum_of_the_images_experts():
    model = per_image(k=2).eval()
    block = model.blocks[model.cfg.moe_layers()[0]].mlp
    x_BND = torch.randn(3, model.cfg.tokens_per_image, 64)
    logits_BE = torch.randn(3, 4)
    y = block(x_BND, logits_BE).y
    gates = logits_BE.softmax(-1)
    for b in range(3):
        top = gates[b].topk(2)
        outputs_E = block.experts(x_BND[b].expand(4, -1, -1))  # every expert on the image's tokens
        want = sum(w * outputs_E[e] for w, e in zip(top.values, top.indices, strict=True))
        assert torch.allclose(y[b], want, atol=1e-5)


def test_superclass_guidance_is_computed_in_training_from_the_model_output():
    model = per_image(superclasses=SUPER).train()
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    out = model(images)
    first = out.routing[model.cfg.moe_layers()[0]]
    logits_BE = first.logits_GSE[0]
    assert torch.equal(out.image_logits_BE, logits_BE)  # the image router's decision is a field of the output
    expected = F.cross_entropy(logits_BE, torch.tensor(SUPER)[labels])
    importance = model.cfg.moe.importance_weight * importance_loss(logits_BE.softmax(-1)[None])
    assert torch.allclose(out.aux_loss, importance, atol=1e-6)  # the model adds no guidance itself
    guidance = superclass_guidance(model.cfg.moe, "cpu")
    total = out.aux_loss + guidance.weighted(out, labels)
    assert torch.allclose(total, importance + 0.3 * expected, atol=1e-6)
    assert guidance.metrics(out, labels)["superclass_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert superclass_guidance(per_image().cfg.moe, "cpu") is None  # no super-classes: nothing to guide
    total.backward()
    assert model.image_router.proj.weight.grad.abs().sum() > 0


def _write(path: Path, mapping) -> Path:
    path.write_text(json.dumps({"class_to_group": mapping}))
    return path


def test_recipe_reads_the_superclasses_file_and_names_its_problems(tmp_path):
    recipe = ROOT / "recipes" / "digits-vmoe.yaml"
    base = ["model.moe.router=per_image", "model.moe.k=1"]
    good = _write(tmp_path / "good.json", SUPER)
    loaded = load_recipe(recipe, [*base, f"model.moe.superclasses={good}"])
    assert loaded.model.moe.superclasses == SUPER  # the resolved recipe carries the list
    cases = {
        "short.json": (SUPER[:9], "groups 9 classes but the model has 10"),
        "three.json": ([g % 3 for g in range(10)], "has 3 super-classes but the model has 4 experts"),
        "junk.json": (None, "cannot read the super-classes"),
    }
    for name, (mapping, message) in cases.items():
        path = _write(tmp_path / name, mapping) if mapping else tmp_path / name
        if mapping is None:
            path.write_text("{not json")
        with pytest.raises(VmoeError, match=message) as e:
            load_recipe(recipe, [*base, f"model.moe.superclasses={path}"])
        assert str(e.value).startswith(str(recipe)) and name in str(e.value)
    with pytest.raises(VmoeError, match="gone.json: cannot read"):
        load_recipe(recipe, [*base, f"model.moe.superclasses={tmp_path / 'gone.json'}"])
    with pytest.raises(VmoeError, match="set model.moe.router=per_image"):
        load_recipe(recipe, [f"model.moe.superclasses={good}"])


def test_pretrain_logs_the_routers_superclass_accuracy(digits, tmp_path):
    good = _write(tmp_path / "super.json", SUPER)
    overrides = ["model.moe.router=per_image", "model.moe.k=1", f"model.moe.superclasses={good}"]
    run = tmp_path / "run"
    pretrain(load_recipe(ROOT / "recipes" / "digits-vmoe.yaml", [*overrides, *settings(digits, 4)]), run)
    logged = [r for r in metrics(run) if "loss" in r]
    assert logged and all("moe1/superclass_top1" in r and "moe1/superclass_loss" in r for r in logged)
    assert all("moe3/superclass_top1" not in r for r in logged)  # the decision belongs to the first MoE block
