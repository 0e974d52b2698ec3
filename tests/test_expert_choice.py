"""Expert-choice routing: experts take their top-C tokens, through the same dispatch and combine."""

from __future__ import annotations

import pytest
import torch

from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MoEMlp
from vmoe_cli.models.routing import expert_choice_plan


def loop_expert_choice(gates: list[list[float]], capacity: int) -> set[tuple[int, int, int]]:
    """(token, expert, slot) of every kept assignment, by a plain loop: each expert sorts its column."""
    kept = set()
    for e in range(len(gates[0])):
        order = sorted(range(len(gates)), key=lambda t: (-gates[t][e], t))  # ties: the earlier token first
        kept |= {(t, e, slot) for slot, t in enumerate(order[:capacity])}
    return kept


@pytest.mark.parametrize("seed", range(20))
def test_plan_equals_a_plain_loop_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    gates = torch.randint(0, 5, (1, 9, 4), generator=g).float() / 4  # few values: many ties
    capacity = int(torch.randint(1, 10, (1,), generator=g))
    plan = expert_choice_plan(gates, capacity)
    kept = {(t, int(plan.expert_GSK[0, t, e]), int(plan.slot_GSK[0, t, e])) for t in range(9) for e in range(4)
            if plan.kept_GSK[0, t, e]}  # fmt: skip
    assert kept == loop_expert_choice(gates[0].tolist(), capacity)
    assert torch.equal(plan.weight_GSK, gates)


def test_moe_block_output_is_the_gate_weighted_sum_of_chosen_experts():
    torch.manual_seed(0)
    cfg = MoEConfig(router="expert_choice", num_experts=3, capacity=2, capacity_factor=None, capacity_multiple=1,
                    group_images=1, expert_init="independent")  # fmt: skip
    moe = MoEMlp(8, 16, cfg).eval()
    x = torch.randn(2, 5, 8)  # 2 groups (images) of 5 tokens
    out = moe(x)
    gates = torch.softmax(x @ moe.router.proj.weight.T, dim=-1)  # [2, 5, 3]
    expected = torch.zeros_like(x)
    for g in range(2):
        for e in range(3):
            for t in torch.sort(gates[g, :, e], descending=True, stable=True).indices[:2]:
                w1, b1, w2, b2 = (p[e] for p in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2))
                h = torch.nn.functional.gelu(x[g, t] @ w1 + b1[0], approximate="tanh")
                expected[g, t] += gates[g, t, e] * (h @ w2 + b2[0])
    torch.testing.assert_close(out.y, expected, atol=1e-5, rtol=1e-5)
    m = out.routing.metrics
    shares = m["tokens_0_experts"] + m["tokens_1_expert"] + m["tokens_2plus_experts"]
    assert shares.item() == pytest.approx(1.0) and m["expert_load"].tolist() == [1.0, 1.0, 1.0]
    assert out.routing.aux_loss.item() == 0.0


def test_router_learns_through_the_combine_weights():
    cfg = MoEConfig(router="expert_choice", num_experts=4, capacity_factor=1.0, group_images=2)
    moe = MoEMlp(8, 16, cfg).train()
    moe(torch.randn(4, 6, 8)).y.square().mean().backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0


def test_soft_moe_matches_its_definition_and_learns():
    """Slots = softmax-over-tokens mixtures of raw tokens; outputs = softmax-over-slots mixtures; normalised logits."""
    from vmoe_cli.models.moe import SoftMoEMlp

    torch.manual_seed(0)
    cfg = MoEConfig(router="soft", num_experts=3, capacity=2, capacity_factor=None, expert_init="independent")
    moe = SoftMoEMlp(8, 16, cfg, tokens=5)
    assert moe.phi.shape == (8, 3, 2)
    x = torch.randn(2, 5, 8)
    out = moe(x)
    for b in range(2):  # one image is one group
        logits = torch.zeros(5, 3, 2)
        for n in range(5):
            for e in range(3):
                for p in range(2):
                    xn, pn = x[b, n] / x[b, n].norm(), moe.phi[:, e, p] / moe.phi[:, e, p].norm()
                    logits[n, e, p] = moe.scale * (xn @ pn)
        dispatch, combine = logits.softmax(0), logits.reshape(5, 6).softmax(1).reshape(5, 3, 2)
        y = torch.zeros(5, 8)
        for e in range(3):
            w1, b1, w2, b2 = (t[e] for t in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2))
            for p in range(2):
                slot = (dispatch[:, e, p, None] * x[b]).sum(0)
                o = torch.nn.functional.gelu(slot @ w1 + b1[0], approximate="tanh") @ w2 + b2[0]
                y += combine[:, e, p, None] * o
        torch.testing.assert_close(out.y[b], y, atol=1e-5, rtol=1e-5)
    out.y.square().mean().backward()
    assert moe.phi.grad.abs().sum() > 0 and moe.scale.grad.abs() > 0 and out.routing.aux_loss.item() == 0


@pytest.mark.parametrize("router", ["sinkhorn_token_choice", "sinkhorn_expert_choice"])
def test_sinkhorn_routers_select_on_the_plan_and_weight_by_softmax(router):
    from vmoe_cli.models.routing import expert_choice_plan, sinkhorn_transport, token_choice_plan

    torch.manual_seed(0)
    logits = torch.randn(2, 12, 4) * 3
    plan = sinkhorn_transport(logits)
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 12), atol=1e-3, rtol=0)  # each token: mass 1
    torch.testing.assert_close(plan.sum(1), torch.full((2, 4), 3.0), atol=1e-3, rtol=0)  # each expert: S/E

    cfg = MoEConfig(router=router, num_experts=4, k=2, capacity_factor=1.0, group_images=1)
    moe = MoEMlp(8, 16, cfg).eval()
    x = torch.randn(2, 12, 8)
    out = moe(x)
    logits = x @ moe.router.proj.weight.T
    p, gates = sinkhorn_transport(logits), logits.softmax(-1)
    if router == "sinkhorn_token_choice":
        expected = token_choice_plan(p, 2, 8, bpr=False)  # C = ceil(12 * 2 * 1.0 / 4) = 6 -> 8
        weights = gates.gather(2, expected.expert_GSK)
    else:
        expected, weights = expert_choice_plan(p, 4), gates  # C = 3 -> 4
    got = out.routing.plan
    assert torch.equal(got.expert_GSK, expected.expert_GSK) and torch.equal(got.slot_GSK, expected.slot_GSK)
    torch.testing.assert_close(got.weight_GSK, weights)
    out.y.square().mean().backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0  # through the softmax combine weights only


@pytest.mark.parametrize("router", ["expert_choice", "sinkhorn_expert_choice"])
def test_expert_choice_metrics_count_experts_per_token(router):
    torch.manual_seed(0)
    cfg = MoEConfig(router=router, num_experts=4, capacity_factor=1.0, group_images=1, capacity_multiple=1)
    moe = MoEMlp(8, 16, cfg).eval()
    out = moe(torch.randn(3, 8, 8))
    experts_GS = out.routing.plan.kept_GSK.sum(dim=-1)  # C = 2 of 8 tokens per expert: some get none
    m = out.routing.metrics
    for name, share in (("tokens_0_experts", experts_GS == 0), ("tokens_1_expert", experts_GS == 1),
                        ("tokens_2plus_experts", experts_GS >= 2)):  # fmt: skip
        assert m[name].item() == pytest.approx(share.float().mean().item())
    assert m["tokens_0_experts"] > 0 and m["dropped_all"] == m["tokens_0_experts"]
    assert (out.routing.plan.kept_GSK.sum(dim=1) <= out.routing.plan.capacity).all()  # never above C per expert
