"""Sparsity-constrained routing: the k-sparse simplex projection, the semi-dual solve, the routers built on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.reference import OpLog
from tests.reference import sparse_simplex_projection as reference_projection
from vmoe_cli.config import load_recipe
from vmoe_cli.eval.sweep import SweepOptions, make_grid, sweep
from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.moe import MoEMlp
from vmoe_cli.models.routing import (
    expert_choice_plan,
    sparse_simplex_projection,
    sparsity_constrained_transport,
    token_choice_plan,
)
from vmoe_cli.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
TWIN = "sparsity_constrained_token_choice"


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])  # dense, mixed and very sparse projections
def test_projection_is_the_nearest_point_of_the_simplex_with_k_nonzeros(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * scale
    for k in range(1, 7):
        expected = torch.tensor([[reference_projection(row, k) for row in rows] for rows in x.tolist()], dtype=x.dtype)
        got = sparse_simplex_projection(x, k)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
        assert ((got > 0).sum(-1) <= k).all()


def semi_dual_with_autograd(similarity_NM: torch.Tensor, k: int, row_mass: float, column_mass: float) -> torch.Tensor:
    """The plan from torch.optim.Adam (lr 1e-2, 20 steps from 0) on F(alpha) = sum_m b max_k(alpha + s_m) - <alpha,
    a>, written as its value at the maximiser (Danskin: the gradient ignores the maximiser's dependence on alpha)."""
    alpha_N = torch.zeros(similarity_NM.shape[0], requires_grad=True)
    optimizer = torch.optim.Adam([alpha_N], lr=1e-2)

    def points_MN(alpha_N: torch.Tensor) -> torch.Tensor:
        return sparse_simplex_projection((alpha_N + similarity_NM.T) / column_mass, k)

    for _ in range(20):
        z_MN = alpha_N + similarity_NM.T
        y_MN = points_MN(alpha_N).detach()
        objective = column_mass * ((y_MN * z_MN).sum() - column_mass / 2 * y_MN.square().sum())
        optimizer.zero_grad()
        (objective - row_mass * alpha_N.sum()).backward()
        optimizer.step()
    return column_mass * points_MN(alpha_N.detach()).T


def test_the_solve_is_adam_on_the_semi_dual():
    torch.manual_seed(0)
    gates_GSE = (torch.randn(2, 12, 4) * 2).softmax(-1)
    for k, (rows, masses) in ((5, (gates_GSE, (1.0, 3.0))), (2, (gates_GSE.transpose(1, 2), (3.0, 1.0)))):
        got = sparsity_constrained_transport(rows, k, *masses)
        expected = torch.stack([semi_dual_with_autograd(group, k, *masses) for group in rows])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # 20 steps of 1e-2 move the rows toward their mass (closer than the plan at alpha = 0), not all the way
        start = sparsity_constrained_transport(rows, k, *masses, iterations=0)
        assert (got.sum(-1) - masses[0]).abs().mean() < (start.sum(-1) - masses[0]).abs().mean()


def sharp_block(router: str, sharpness: float = 8.0, **moe: object) -> MoEMlp:
    """A block of 4 experts whose router weights are scaled up: confident gates, so that some expert columns of
    the plan get fewer than C non-zeros."""
    torch.manual_seed(0)
    cfg = MoEConfig(router=router, num_experts=4, k=2, group_images=1, capacity_multiple=1, **moe)
    block = MoEMlp(8, 16, cfg)
    with torch.no_grad():
        block.router.proj.weight.mul_(sharpness)
    return block


def test_each_expert_takes_its_top_c_tokens_on_a_plan_whose_columns_sum_to_s_over_e():
    block = sharp_block("sparsity_constrained", capacity_factor=2.0).eval()
    x = torch.randn(3, 12, 8)  # 3 groups of S = 12 tokens: C = 12 * 2 / 4 = 6
    out = block(x)
    logits = x @ block.router.proj.weight.T
    gates = logits.softmax(-1)
    transport = sparsity_constrained_transport(gates, 6, row_mass=1.0, column_mass=3.0)
    torch.testing.assert_close(transport.sum(1), torch.full((3, 4), 3.0))  # each expert: n / E
    nonzeros_GE = (transport > 0).sum(1)
    assert (transport >= 0).all() and (nonzeros_GE <= 6).all() and (nonzeros_GE < 6).any()
    plan, expected = out.routing.plan, expert_choice_plan(transport, 6)
    assert plan.capacity == 6 and torch.equal(plan.slot_GSK, expected.slot_GSK)
    assert (plan.kept_GSK.sum(1) == 6).all()  # zero-valued tokens fill the columns with fewer non-zeros
    torch.testing.assert_close(plan.weight_GSK, gates)  # combine weights: the softmax, not the plan
    assert out.routing.aux_loss.item() == 0 and "tokens_0_experts" in out.routing.metrics


def test_the_token_choice_twin_takes_the_top_k_experts_per_token_on_the_transposed_plan():
    block = sharp_block(TWIN, capacity_factor=1.0, bpr=True).eval()
    x = torch.randn(3, 12, 8)  # C = 12 * 2 * 1.0 / 4 = 6
    out = block(x)
    gates = (x @ block.router.proj.weight.T).softmax(-1)
    transport = sparsity_constrained_transport(gates.transpose(1, 2), 2, row_mass=3.0, column_mass=1.0).transpose(1, 2)
    torch.testing.assert_close(transport.sum(2), torch.ones(3, 12))  # each token: mass 1, on at most K experts
    assert ((transport > 0).sum(2) <= 2).all()
    plan, expected = out.routing.plan, token_choice_plan(transport, 2, 6, bpr=True)
    assert torch.equal(plan.expert_GSK, expected.expert_GSK) and torch.equal(plan.slot_GSK, expected.slot_GSK)
    torch.testing.assert_close(plan.weight_GSK, gates.gather(2, expected.expert_GSK))


@pytest.mark.parametrize("router", ["sparsity_constrained", TWIN])
def test_the_router_has_no_noise_and_learns_through_its_combine_weights(router):
    block = sharp_block(router, sharpness=1.0, capacity_factor=1.0).train()
    x = torch.randn(4, 12, 8)
    out = block(x)
    torch.testing.assert_close(out.routing.logits_GSE, x @ block.router.proj.weight.T)  # training: no noise
    target = out.y.detach()  # the output of these router weights: start from others and learn them back
    with torch.no_grad():
        block.router.proj.weight.add_(0.5 * torch.randn_like(block.router.proj.weight))
    optimizer = torch.optim.Adam(block.router.parameters(), lr=0.05)  # the experts stay as they are
    losses = []
    for _ in range(15):
        loss = (block(x).y - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert block.router.proj.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.5 * losses[0]  # choices change as the router moves: the loss is not monotone


@pytest.mark.parametrize("router", ["sparsity_constrained", TWIN])
def test_a_training_step_never_reads_back_to_the_host(router):
    block = sharp_block(router, capacity_factor=1.0).train()
    with OpLog() as ops:
        out = block(torch.randn(4, 6, 8, requires_grad=True))
        out.y.square().sum().backward()
        assert out.routing.metrics["dropped_all"].ndim == 0
    assert "sort" in ops.names  # the log saw the solve
    assert "_local_scalar_dense" not in ops.names and "item" not in ops.names


def test_pretrain_on_digits_then_sweep_its_capacity(digits, tmp_path):
    overrides = [f"data.shards={digits}", "model.moe.router=sparsity_constrained", "model.moe.capacity_factor=2.5"]
    overrides += [f"train.{key}" for key in ("steps=20", "batch_size=32", "lr=0.005", "warmup_steps=2", "eval_every=0")]
    result = pretrain(load_recipe(ROOT / "recipes" / "digits-vmoe.yaml", overrides), tmp_path / "run")
    assert result["eval_top1"] > 0.2  # 10 classes: chance is 0.1
    options = SweepOptions(split="minival", batch_size=64, throughput_batch=16, repeats=1, warmup=0)
    grid = make_grid([1, 2], [0.25, 2.5], [False, True])
    results = sweep(str(tmp_path / "run"), str(digits), grid, tmp_path / "sweep", options)
    assert results["axes"] == ["capacity_factor"] and results["router"] == "sparsity_constrained"
    rows = results["rows"]  # K and BPR held at the trained values: one row per capacity
    assert [(r["k"], r["bpr"], r["capacity_factor"]) for r in rows] == [(2, False, 0.25), (2, False, 2.5)]
    assert rows[0]["dropped_all"] > rows[1]["dropped_all"]
