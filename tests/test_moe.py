"""The MoE block: index dispatch against a one-hot einsum oracle, drops, gradients, memory shape."""

import pytest
import torch
from reference import OpLog, einsum_moe

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MoEMlp


def make_block(seed=0, **moe):
    torch.manual_seed(seed)
    settings = {"num_experts": 4, "k": 2, "capacity_factor": 1.0, "group_images": 2, "expert_init": "independent"}
    settings.update(moe)
    return MoEMlp(8, 16, MoEConfig(**settings))


@pytest.mark.parametrize("k", [1, 2])  # K = 1 takes top-1 by max and combines without a sum over K
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("cf", [0.5, 1.0, 4.0])
def test_index_dispatch_equals_einsum_oracle_in_outputs_and_gradients(k, bpr, cf):
    block = make_block(k=k, bpr=bpr, capacity_factor=cf, importance_weight=0.0)
    block.eval()
    x = torch.randn(4, 6, 8, requires_grad=True)
    probe = torch.randn(4, 6, 8)

    out = block(x)
    (out.y * probe).sum().backward()
    ours = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in block.named_parameters()}}

    x.grad = None
    block.zero_grad()
    x_GSD = x.reshape(2, 12, 8)
    gates = torch.softmax(x_GSD @ block.router.proj.weight.T, dim=-1)
    y = einsum_moe(x_GSD, gates, k, out.routing.plan.capacity, bpr, block.experts).reshape(4, 6, 8)
    (y * probe).sum().backward()
    oracle = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}

    torch.testing.assert_close(out.y, y, rtol=1e-5, atol=1e-6)
    assert ours.keys() == oracle.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], oracle[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tokens_dropped_by_all_choices_get_zero():
    block = make_block(capacity_factor=0.25, capacity_multiple=1)
    block.eval()
    out = block(torch.randn(4, 6, 8))
    dropped_S = (~out.routing.plan.kept_GSK).all(dim=-1).flatten()
    assert dropped_S.any() and not dropped_S.all()
    y_S = out.y.reshape(-1, 8)
    assert torch.all(y_S[dropped_S] == 0)
    assert torch.all(y_S[~dropped_S].abs().sum(-1) > 0)


def test_gradients_reach_the_router_through_the_combine_weights():
    block = make_block(importance_weight=0.0, load_weight=0.0, noise_std=0.0)
    block.train()
    out = block(torch.randn(4, 6, 8))
    assert out.routing.aux_loss.item() == 0.0
    out.y.square().sum().backward()
    assert block.router.proj.weight.grad.abs().sum() > 0


def test_evaluation_is_deterministic_and_training_is_noisy():
    block = make_block()
    x = torch.randn(4, 6, 8)
    block.eval()
    assert torch.equal(block(x).y, block(x).y)
    block.train()
    assert not torch.equal(block(x).y, block(x).y)


def test_identical_and_independent_expert_init():
    same = make_block(expert_init="identical").experts
    for p in same.parameters():
        assert torch.equal(p[0], p[-1])
    different = make_block(expert_init="independent").experts
    assert not torch.equal(different.w1[0], different.w1[1])


def test_group_tokens():
    per_image = MoEConfig(group_images=8)  # whole images: the largest divisor of the batch not above 8
    assert [per_image.group_tokens(b, 5) // 5 for b in (64, 12, 7, 13, 3)] == [8, 6, 7, 1, 3]
    assert per_image.group_tokens(None, 5) == 40
    in_tokens = MoEConfig(group_size=6)  # the official reshape(-1, group_size): groups straddle images
    assert in_tokens.group_tokens(4, 3) == 6  # 12 tokens, 2 groups
    assert in_tokens.group_tokens(3, 5) == 5  # 15 tokens: falls back to whole images (6 // 5 = 1 image)
    assert in_tokens.group_tokens(None, 5) == 6


def test_group_size_in_tokens_routes_consecutive_tokens():
    cfg = MoEConfig(num_experts=4, k=2, capacity_factor=1.0, group_size=6, expert_init="independent")
    block = MoEMlp(8, 16, cfg).eval()
    x_BND = torch.randn(4, 3, 8)  # 12 tokens -> groups of tokens 0-5 and 6-11, across images 0-1 and 2-3
    y = block(x_BND).y
    flat = x_BND.reshape(2, 6, 8)
    for g in range(2):
        alone = MoEMlp(8, 16, cfg).eval()
        alone.load_state_dict(block.state_dict())
        assert torch.allclose(alone(flat[g : g + 1]).y.reshape(6, 8), y.reshape(12, 8)[6 * g : 6 * g + 6], atol=1e-6)


def test_no_tensor_of_size_tokens_x_experts_x_capacity():
    # Tokens per group (S=256) far exceed the width and hidden size (8, 16), so a [G, S, E, C]
    # tensor would be the largest thing in the pass by a wide margin.
    torch.manual_seed(0)
    block = MoEMlp(8, 16, MoEConfig(num_experts=8, k=2, capacity_factor=1.0, group_images=4))
    x = torch.randn(8, 64, 8, requires_grad=True)
    with OpLog() as mode:
        out = block(x)
        (out.y.sum() + out.routing.aux_loss).backward()
    G, S, E, C = 2, 256, 8, out.routing.plan.capacity
    assert mode.largest < G * S * E * C / 4
