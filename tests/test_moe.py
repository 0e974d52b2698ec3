"""The MoE block: index dispatch against a one-hot einsum oracle, drops, gradients, memory shape."""

import pytest
import torch
from reference import einsum_moe
from torch.utils._python_dispatch import TorchDispatchMode

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MoEMlp, group_images


def make_block(seed=0, **moe):
    torch.manual_seed(seed)
    settings = {"num_experts": 4, "k": 2, "capacity_factor": 1.0, "group_images": 2, "expert_init": "independent"}
    settings.update(moe)
    return MoEMlp(8, 16, MoEConfig(**settings))


@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("cf", [0.5, 1.0, 4.0])
def test_index_dispatch_equals_einsum_oracle_in_outputs_and_gradients(bpr, cf):
    block = make_block(bpr=bpr, capacity_factor=cf, importance_weight=0.0)
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
    y = einsum_moe(x_GSD, gates, 2, out.routing.plan.capacity, bpr, block.experts).reshape(4, 6, 8)
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


def test_group_images_is_largest_divisor():
    assert group_images(64, 8) == 8
    assert group_images(12, 8) == 6
    assert group_images(7, 8) == 7
    assert group_images(13, 8) == 1
    assert group_images(3, 8) == 3


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_size_tokens_x_experts_x_capacity():
    # Tokens per group (S=256) far exceed the width and hidden size (8, 16), so a [G, S, E, C]
    # tensor would be the largest thing in the pass by a wide margin.
    torch.manual_seed(0)
    block = MoEMlp(8, 16, MoEConfig(num_experts=8, k=2, capacity_factor=1.0, group_images=4))
    x = torch.randn(8, 64, 8, requires_grad=True)
    with LargestTensor() as mode:
        out = block(x)
        (out.y.sum() + out.routing.aux_loss).backward()
    G, S, E, C = 2, 256, 8, out.routing.plan.capacity
    assert mode.largest < G * S * E * C / 4
