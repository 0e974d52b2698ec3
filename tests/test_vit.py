"""ViT / V-MoE: every preset runs, FLOPs match a counter, routing changes at inference."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vmoe_cli.errors import VmoeError
from vmoe_cli.eval.flops import flops_per_image, model_card, parameter_counts
from vmoe_cli.models.config import ModelConfig, MoEConfig, moe_layer_indices
from vmoe_cli.models.presets import SIZES
from vmoe_cli.models.vit import VisionTransformer, resize_pos_embed


def nano(**changes) -> ModelConfig:
    settings = {"variant": "nano/2", "image_size": 8, "channels": 1, "num_classes": 10}
    settings.update(changes)
    return ModelConfig(**settings)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("moe", [False, True])
def test_every_preset_runs_forward_and_backward(size, moe):
    patch = 4
    tiny = size in ("nano", "micro")
    cfg = ModelConfig(
        variant=f"{size}/{patch}",
        image_size=2 * patch,
        num_classes=5,
        depth=None if tiny else 2,
        moe=MoEConfig(layers="last-1", num_experts=2, k=1) if moe else None,
    )
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    out = model(torch.randn(2, 3, 2 * patch, 2 * patch))
    assert out.logits.shape == (2, 5)
    (out.logits.mean() + out.pre_logits.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(out.routing) == int(moe)


FLOP_CASES = {
    "dense cls": nano(representation_size=32),
    "dense gap": nano(pool="gap"),
    "moe last-2": nano(moe=MoEConfig(layers="last-2", num_experts=4)),
    "moe every-2 gap K=1 fixed C": nano(pool="gap", moe=MoEConfig(k=1, capacity_factor=None, capacity=5)),
    "moe group 3 images": nano(moe=MoEConfig(layers=[0, 3], num_experts=3, group_images=3, capacity_factor=0.7)),
    "expert choice": nano(moe=MoEConfig(router="expert_choice", num_experts=4, capacity_factor=1.0)),
    "soft moe": nano(pool="gap", moe=MoEConfig(router="soft", num_experts=4, capacity_factor=1.0)),
    "sinkhorn token choice": nano(moe=MoEConfig(router="sinkhorn_token_choice", num_experts=4)),
    "sinkhorn expert choice": nano(moe=MoEConfig(router="sinkhorn_expert_choice", num_experts=4)),
    "sparsity constrained": nano(moe=MoEConfig(router="sparsity_constrained", num_experts=4, capacity_factor=2.0)),
    "sparsity constrained token choice": nano(moe=MoEConfig(router="sparsity_constrained_token_choice", num_experts=3)),
    "per image K=1": nano(moe=MoEConfig(router="per_image", layers="last-2", num_experts=4, k=1)),
    "per image K=2 tokens groups": nano(moe=MoEConfig(router="per_image", num_experts=3, k=2, group_size=20)),
    "per image K=1 capacity": nano(moe=MoEConfig(router="per_image", num_experts=4, k=1, dropless=False)),
    "moe dropless K=2": nano(moe=MoEConfig(layers="last-2", num_experts=4, dropless=True)),
    "sinkhorn token choice dropless K=1": nano(moe=MoEConfig(router="sinkhorn_token_choice", k=1, dropless=True)),
    "moe groups of 20 tokens": nano(moe=MoEConfig(num_experts=3, group_size=20, capacity_factor=1.5)),
    "conv stem, 1 conv": nano(stem="conv"),
    "conv stem, 2 convs, moe": nano(variant="nano/4", stem="conv", moe=MoEConfig(layers="last-1", num_experts=3)),
}


@pytest.mark.parametrize("name", FLOP_CASES)
def test_analytic_flops_match_flop_counter(name):
    cfg = FLOP_CASES[name]
    model = VisionTransformer(cfg).eval()
    batch = 12
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA is counted
        model(torch.randn(batch, 1, 8, 8))
    assert counter.get_total_flops() == pytest.approx(batch * flops_per_image(cfg, batch), rel=1e-12)


def test_conv_stem_layers_and_grid():
    # 7 x 7 patches: 3 stride-2 convs (28 -> 14 -> 7 -> 4 px) with channels 32, 64, 128, then 1x1 to D=128
    cfg = ModelConfig(variant="micro/7", image_size=28, channels=1, num_classes=10, pool="gap", stem="conv")
    model = VisionTransformer(cfg)
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 128, (3, 3), (2, 2)), (128, 128, (1, 1), (1, 1))
    ]  # fmt: skip
    assert model.embed(torch.randn(2, 1, 28, 28)).shape == (2, 16, 128)
    card = model_card(cfg)
    assert card["stem"] == "conv stem [32, 64, 128] + 1x1"
    assert parameter_counts(cfg)[0] == sum(p.numel() for p in model.parameters())
    # a new resolution keeps the stem's weights and follows the grid: 35 px -> 18 -> 9 -> 5, 5 x 5 tokens
    bigger = VisionTransformer(dataclasses.replace(cfg, image_size=35))
    bigger.patch_embed.load_state_dict(model.patch_embed.state_dict())
    assert bigger.embed(torch.randn(1, 1, 35, 35)).shape == (1, 25, 128)
    with pytest.raises(VmoeError, match="56 px into a 7-token side, not 8"):  # the stem's stride is 8, not 7
        dataclasses.replace(cfg, image_size=56).validate()


def test_conv_stem_refuses_a_grid_it_cannot_make():
    # 224 px at patch 14 is a 16-token side, but 4 stride-2 convs give 14
    with pytest.raises(VmoeError, match="model.stem=conv"):
        ModelConfig(variant="S/14", image_size=224, stem="conv").validate()
    ModelConfig(variant="S/16", image_size=224, stem="conv").validate()


def test_parameter_counts():
    cfg = nano(moe=MoEConfig(layers="last-2", num_experts=4, k=2))
    model = VisionTransformer(cfg)
    total, active = parameter_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    per_expert = 64 * 128 + 128 + 128 * 64 + 64
    assert active == total - 2 * (4 - 2) * per_expert
    assert parameter_counts(nano())[0] == parameter_counts(nano())[1]


def test_vit_b16_parameter_count_and_moe_growth():
    # ViT-B/16 with a 1000-way head has 86,567,656 parameters (the ViT paper's "86M").
    dense = ModelConfig(variant="B/16")
    assert parameter_counts(dense) == (86_567_656, 86_567_656)
    # Every-2 with E=8: each of the 6 MoE blocks adds 7 copies of the 4.7M-parameter MLP and a router.
    vmoe = ModelConfig(variant="B/16", moe=MoEConfig(layers="every-2", num_experts=8, k=2))
    mlp = 768 * 3072 + 3072 + 3072 * 768 + 768
    total, active = parameter_counts(vmoe)
    assert total == 86_567_656 + 6 * (7 * mlp + 768 * 8)
    assert active == 86_567_656 + 6 * (1 * mlp + 768 * 8)


def test_model_card_rows():
    card = model_card(nano(moe=MoEConfig(layers="last-2", num_experts=4, k=2, capacity_factor=1.25)))
    assert card["MoE blocks"].startswith("1, 3")
    assert card["capacity per expert per group C"] == 88  # ceil(8 images * 17 tokens * K=2 * 1.25 / 4) = 85 -> 88
    assert card["total parameters"] > card["parameters active per token"]


def test_set_routing_changes_routing_not_weights():
    torch.manual_seed(0)
    model = VisionTransformer(nano(moe=MoEConfig(layers="last-2", num_experts=4, capacity_factor=1.0))).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    before = model(x)
    model.set_routing(k=1, capacity_factor=0.25, bpr=True)
    after = model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert after.routing[3].plan.expert_GSK.shape[-1] == 1
    assert after.routing[3].metrics["dropped_all"] > before.routing[3].metrics["dropped_all"]
    assert all(r.plan.capacity == after.routing[3].plan.capacity for r in after.routing.values())
    with pytest.raises(VmoeError):
        model.set_routing(k=9)
    with pytest.raises(ValueError):
        model.set_routing(num_experts=2)


def test_moe_layer_placement():
    assert moe_layer_indices("every-2", 12) == [1, 3, 5, 7, 9, 11]
    assert moe_layer_indices("last-2", 8) == [5, 7]
    assert moe_layer_indices("last-2", 4) == [1, 3]  # the official fixture's "Last 2"
    assert moe_layer_indices([3, 0], 4) == [0, 3]
    with pytest.raises(VmoeError, match="layers"):
        moe_layer_indices("first-2", 8)
    with pytest.raises(VmoeError, match="outside"):
        moe_layer_indices([8], 8)


def test_resize_pos_embed_keeps_cls_and_is_identity_at_same_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.allclose(resize_pos_embed(pos, 4, has_cls=True), pos, atol=1e-6)
    bigger = resize_pos_embed(pos, 6, has_cls=True)
    assert bigger.shape == (1, 37, 8) and torch.equal(bigger[:, 0], pos[:, 0])


def test_aux_loss_sums_the_moe_blocks():
    model = VisionTransformer(nano(moe=MoEConfig(layers="last-2", num_experts=4))).eval()
    out = model(torch.randn(8, 1, 8, 8))
    assert out.aux_loss.item() == pytest.approx(sum(r.aux_loss.item() for r in out.routing.values()))
