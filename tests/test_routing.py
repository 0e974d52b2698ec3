"""The token-choice router against worked examples and plain-Python references."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from reference import OpLog, reference_slots
from torch import nn

from vmoe_cli.config import recipe_from_dict
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ROUTER_KINDS, MoEConfig
from vmoe_cli.models.moe import MoEMlp
from vmoe_cli.models.routing import (
    TokenChoiceRouter,
    capacity,
    expert_softmax,
    group_capacity,
    gshard_loss,
    importance_loss,
    load_loss,
    make_router,
    token_choice_plan,
    z_loss,
)


def plan_as_lists(gates, k, c, bpr):
    plan = token_choice_plan(torch.tensor([gates]), k, c, bpr)
    return [
        [(e, s if s < c else None) for e, s in zip(es, ss, strict=True)]
        for es, ss in zip(plan.expert_GSK[0].tolist(), plan.slot_GSK[0].tolist(), strict=True)
    ]


DESIGN_GATES = [[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]


def test_design_dispatch_example_without_bpr():
    assert plan_as_lists(DESIGN_GATES, k=2, c=2, bpr=False) == [
        [(0, 0), (2, 1)],
        [(0, 1), (2, None)],
        [(2, 0), (0, None)],
    ]


def test_design_dispatch_example_with_bpr():
    assert plan_as_lists(DESIGN_GATES, k=2, c=2, bpr=True) == [
        [(0, 1), (2, None)],
        [(0, 0), (2, 1)],
        [(2, 0), (0, None)],
    ]


LOSS_GATES = torch.tensor([[[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]]])


def test_expert_softmax_and_top1_ties_in_its_layout():
    logits = torch.randn(3, 33, 8, generator=torch.Generator().manual_seed(0))
    gates = expert_softmax(logits)
    torch.testing.assert_close(gates, logits.softmax(dim=-1), rtol=1e-6, atol=1e-7)
    tied = torch.zeros(2, 5, 8)
    tied[0, :, [3, 5]] = 1.0  # experts 3 and 5 share the top logit: the lower index wins
    plan = token_choice_plan(expert_softmax(tied), 1, 8, bpr=False)
    assert plan.expert_GSK[0, :, 0].tolist() == [3] * 5 and plan.expert_GSK[1, :, 0].tolist() == [0] * 5


def test_importance_loss_reference_value():
    assert importance_loss(LOSS_GATES).item() == pytest.approx(0.03875, abs=1e-6)


def test_gshard_loss_reference_value():
    assert gshard_loss(LOSS_GATES).item() == pytest.approx(1.0875, abs=1e-6)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("bpr", [False, True])
def test_plan_matches_reference_loop_on_random_gates(seed, bpr):
    gen = torch.Generator().manual_seed(seed)
    S, E = 24, 5
    k = 1 + seed % 3
    c = 1 + seed % 7
    gates = torch.rand(2, S, E, generator=gen).softmax(-1)
    if seed % 4 == 0:  # plant exact ties in gates and in top-1 gates
        gates = (gates * 4).round() / 4
    plan = token_choice_plan(gates, k, c, bpr)
    for g in range(2):
        expected = reference_slots(gates[g].tolist(), k, c, bpr)
        got = [
            [(e, s if s < c else None) for e, s in zip(es, ss, strict=True)]
            for es, ss in zip(plan.expert_GSK[g].tolist(), plan.slot_GSK[g].tolist(), strict=True)
        ]
        assert got == expected
    assert plan.requested_GE.sum().item() == 2 * S * k  # every choice is counted once


@pytest.mark.parametrize("bpr", [False, True])
def test_plan_invariants(bpr):
    gen = torch.Generator().manual_seed(0)
    G, S, E, k, c = 3, 64, 6, 2, 12
    gates = torch.rand(G, S, E, generator=gen).softmax(-1)
    plan = token_choice_plan(gates, k, c, bpr)
    kept = plan.kept_GSK
    for g in range(G):
        for e in range(E):
            mine = plan.expert_GSK[g] == e
            slots = plan.slot_GSK[g][mine & kept[g]]
            assert len(slots) <= c and len(set(slots.tolist())) == len(slots)  # capacity never exceeded
            first = plan.slot_GSK[g][:, 0][mine[:, 0]]
            second = plan.slot_GSK[g][:, 1][mine[:, 1]]
            if len(first) and len(second):
                assert first.max() < second.min()  # every first choice before any second choice
        if bpr:  # within rank 0, an expert's slots follow descending top-1 gates
            for e in range(E):
                mine = plan.expert_GSK[g, :, 0] == e
                top1 = plan.weight_GSK[g, :, 0][mine]
                by_slot = top1[plan.slot_GSK[g, :, 0][mine].argsort()]
                assert torch.all(by_slot[:-1] >= by_slot[1:])
    # combine weights are the raw gates, not renormalised over the K
    assert torch.equal(plan.weight_GSK, gates.sort(-1, descending=True).values[..., :k])


def test_capacity_rule():
    assert capacity(34 * 2, 4, 1.05) == 20  # ceil(17.85) = 18 -> multiple of 4
    assert capacity(34 * 2, 4, 4.0) == 68
    assert capacity(34 * 2, 4, 1.05, multiple=1) == 18
    assert capacity(100, 8, None, fixed=7) == 7
    with pytest.raises(VmoeError, match="capacity"):
        capacity(10, 8, 0.0, multiple=1)


def test_load_loss_equals_direct_evaluation():
    gen = torch.Generator().manual_seed(3)
    S, E, k, sigma = 10, 4, 2, 0.25
    logits = torch.randn(1, S, E, generator=gen, dtype=torch.float64)
    noisy = logits + sigma * torch.randn(1, S, E, generator=gen, dtype=torch.float64)
    thresholds = [sorted(noisy[0, t].tolist(), reverse=True)[k - 1] for t in range(S)]
    probs = []
    for e in range(E):
        p = 0.0
        for t in range(S):
            z = (thresholds[t] - logits[0, t, e].item()) / sigma
            p += 1 - 0.5 * (1 + math.erf(z / math.sqrt(2)))
        probs.append(p / S)
    expected = (statistics.pstdev(probs) / statistics.mean(probs)) ** 2
    threshold = torch.tensor(thresholds, dtype=torch.float64).view(1, S, 1)
    assert load_loss(logits, threshold, sigma).item() == pytest.approx(expected, rel=1e-9)


def test_z_loss_value():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_router_noise_only_in_training_and_losses():
    torch.manual_seed(0)
    router = TokenChoiceRouter(16, MoEConfig(num_experts=4, k=2, capacity_factor=2.0, zloss_weight=0.1))
    x = torch.randn(2, 8, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.plan.weight_GSK, b.plan.weight_GSK)
    assert "load_loss" not in a.metrics and "z_loss" in a.metrics
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.plan.weight_GSK, d.plan.weight_GSK)
    assert "load_loss" in c.metrics and "gshard_loss" not in c.metrics  # GShard's only when weighted
    # the router takes the load loss's threshold from its K-th choice: the same as a top-K of the noisy logits
    clean, noisy = F.linear(x, router.proj.weight), c.logits_GSE
    threshold = noisy.topk(2, dim=-1).values[..., -1:]
    assert c.metrics["load_loss"].item() == pytest.approx(load_loss(clean, threshold, 0.25).item(), rel=1e-6)
    expected = 0.005 * c.metrics["importance_loss"] + 0.005 * c.metrics["load_loss"] + 0.1 * c.metrics["z_loss"]
    assert c.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    router.cfg.gshard_weight = 0.01
    e = router(x)
    # on the gates the choice was made on: noisy in training, as the official code
    assert e.metrics["gshard_loss"].item() == pytest.approx(gshard_loss(e.logits_GSE.softmax(-1)).item(), rel=1e-6)
    expected = expected - 0.005 * c.metrics["load_loss"] + 0.005 * e.metrics["load_loss"]
    assert e.aux_loss.item() == pytest.approx((expected + 0.01 * e.metrics["gshard_loss"]).item(), rel=1e-6)


def test_routing_metrics_count_drops_and_load():
    gates = torch.tensor([DESIGN_GATES])
    router = TokenChoiceRouter(3, MoEConfig(num_experts=3, k=2, capacity=2))
    router.eval()
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(3))
    out = router(gates.clamp(min=1e-6).log())  # softmax(log g) = g / sum g: same order as the example's gates
    assert out.metrics["dropped_all"].item() == 0.0
    assert out.metrics["dropped_any"].item() == pytest.approx(2 / 3)
    assert out.metrics["expert_load"].tolist() == [1.0, 0.0, 1.0]
    assert out.metrics["load_entropy"].item() == pytest.approx(math.log(2) / math.log(3), rel=1e-6)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "sinkhorn_token_choice"])
def test_a_training_step_of_an_moe_block_never_reads_back_to_the_host(router):
    """Reading a value back (`.item()`, or F.one_hot's range check) stalls a GPU every step."""
    torch.manual_seed(0)
    block = MoEMlp(8, 16, MoEConfig(num_experts=4, k=2, capacity_factor=1.0, group_images=2, router=router))
    block.train()
    with OpLog() as ops:
        out = block(torch.randn(4, 6, 8, requires_grad=True))
        (out.y.square().sum() + out.routing.aux_loss).backward()
        assert out.routing.metrics["dropped_all"].ndim == 0
    assert "_local_scalar_dense" not in ops.names and "item" not in ops.names


def test_routing_metrics_are_computed_on_first_use_only():
    router = TokenChoiceRouter(8, MoEConfig(num_experts=4, k=2, capacity_factor=1.0)).train()
    out = router(torch.randn(2, 6, 8))
    with OpLog() as first:
        metrics = out.metrics
    with OpLog() as again:
        assert out.metrics is metrics
    assert "log" in first.names  # the load entropy: computed now, not during the forward
    assert again.names == []
    assert {"dropped_all", "dropped_any", "expert_load", "load_entropy", "importance_loss", "load_loss"} <= set(metrics)


def test_every_router_kind_is_listed_and_an_unknown_one_is_an_error():
    for name, kind in ROUTER_KINDS.items():
        cfg = MoEConfig(router=name, num_experts=4, k=1)
        if kind.has_plan:
            assert isinstance(make_router(8, cfg), nn.Module)
        else:  # Soft MoE mixes tokens in its own block: it has no token router
            with pytest.raises(ValueError, match="no token router"):
                make_router(8, cfg)
    with pytest.raises(ValueError, match="no token router"):
        make_router(8, MoEConfig(router="sinkhorn_expert_chioce"))  # no fallback to a similar kind
    with pytest.raises(VmoeError, match="did you mean 'expert_choice'"):
        recipe_from_dict({"model": {"moe": {"router": "expert_chioce"}}})


def test_capacity_rounding_follows_the_official_rule_and_its_float_quirks():
    assert capacity(26 * 2, 8, 1.0, multiple=1, rounding="ceil") == 7  # 6.5 up
    assert capacity(26 * 2, 8, 1.0, multiple=1, rounding="round") == 6  # 6.5 to even, as Python's round
    assert capacity(50, 5, 1.1, multiple=1) == 12  # 50 * 1.1 / 5 = 11.000000000000002: ceil gives 12
    assert capacity(50, 5, 1.1, multiple=1, rounding="round") == 11
    assert capacity(26 * 2, 8, 1.0, multiple=4, rounding="round") == 8  # then up to the multiple
    with pytest.raises(VmoeError, match="capacity is 0"):
        capacity(3, 8, 1.0, multiple=1, rounding="round")  # round(0.375) = 0
    cfg = MoEConfig(num_experts=8, k=2, capacity_factor=1.0, capacity_multiple=1, capacity_rounding="round")
    assert group_capacity(cfg, 26) == 6


def test_gshard_loss_is_computed_on_the_noisy_gates_in_training():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, k=2, capacity_factor=1.0, gshard_weight=1.0, noise_std=1.0)
    router = TokenChoiceRouter(8, cfg).train()
    x = torch.randn(2, 16, 8)
    out = router(x)
    noisy, clean = out.logits_GSE, x @ router.proj.weight.T  # noisy: the logits the choice was made on
    torch.testing.assert_close(out.metrics["gshard_loss"], gshard_loss(noisy.softmax(-1)))
    assert not torch.allclose(out.metrics["gshard_loss"], gshard_loss(clean.softmax(-1)))
