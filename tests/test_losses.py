"""Routing losses on hand-computed examples: load balance, sparsity hinge, z-loss, ReMoLE L1 controller."""

from __future__ import annotations

import math

import pytest
import torch

from ldmole import (ReMoLEL1Controller, RoutingRecord, active_expert_fraction, l1_penalty, load_balance_loss,
                    router_z_loss, sparsity_loss)


def record(weights, router="topk", scores=None, lam=None, mask=None) -> RoutingRecord:
    weights = torch.as_tensor(weights, dtype=torch.float32)
    scores = weights.clone() if scores is None else torch.as_tensor(scores, dtype=torch.float32)
    lam = None if lam is None else torch.as_tensor(lam, dtype=torch.float32)
    mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    return RoutingRecord("m", 0, "q_proj", router, scores, weights, lam, mask)


def test_load_balance_hand_computed():
    # 2 tokens, 3 experts. activations: expert0 twice, expert1 once -> f = [2/3, 1/3, 0]
    # P = mean weights = [(0.6+0.5)/2, 0.4/2, 0.5/2] = [0.55, 0.2, 0.25]
    rec = record([[[0.6, 0.4, 0.0], [0.5, 0.0, 0.5]]])
    # expert2 also active in token 2: f = [2/4, 1/4, 1/4]
    expected = 3 * (0.5 * 0.55 + 0.25 * 0.2 + 0.25 * 0.25)
    assert load_balance_loss([rec]).item() == pytest.approx(expected)


def test_load_balance_ignores_padded_tokens_and_averages_modules():
    padded = record([[[1.0, 0.0], [0.0, 1.0]]], mask=[[False, True]])
    # only token 2 counts: f = [0, 1], P = [0, 1] -> 2 * 1 = 2
    assert load_balance_loss([padded]).item() == pytest.approx(2.0)
    balanced = record([[[1.0, 0.0], [0.0, 1.0]]])  # f = P = [0.5, 0.5] -> 1
    assert load_balance_loss([padded, balanced]).item() == pytest.approx(1.5)


def test_load_balance_gives_gradient_for_softmax_routing():
    scores = torch.tensor([[[2.0, 0.0, -1.0], [1.5, 0.2, 0.1]]], requires_grad=True)
    rec = record(torch.softmax(scores, -1), router="softmax")
    rec.weights = torch.softmax(scores, -1)
    loss = load_balance_loss([rec])
    # argmax assignment: both tokens -> expert 0, f = [1, 0, 0]; L = 3 * P_0
    assert loss.item() == pytest.approx(3 * rec.weights[..., 0].mean().item())
    loss.backward()
    assert scores.grad.abs().sum() > 0, "dense routing must get a load-balance gradient"
    naive = 3 * (torch.full((3,), 1 / 3) * rec.weights.detach().mean((0, 1))).sum()
    assert naive.item() == pytest.approx(1.0), "sanity: the naive form is the constant 1 the paper warns about"


def test_sparsity_hinge_hand_computed_and_masked():
    scores = [[[3.0, 1.0, 0.0, -1.0], [0.5, 0.4, 0.3, 0.2]]]
    lam = torch.tensor([[0.0, 0.5]], requires_grad=True)
    rec = record(torch.zeros(1, 2, 4), router="sparsegen", scores=scores, lam=lam)
    rec.lam = lam
    # k=2: lower = 1 - (U_2 - 2 u_3). token1: 1 - (4 - 0) = -3 -> hinge 0; token2: 1 - (0.9 - 0.6) = 0.7 -> 0.2
    loss = sparsity_loss([rec], 2)
    assert loss.item() == pytest.approx((0.0 + 0.2) / 2)
    loss.backward()
    torch.testing.assert_close(lam.grad, torch.tensor([[0.0, -0.5]]))
    rec.mask = torch.tensor([[True, False]])
    assert sparsity_loss([rec], 2).item() == 0.0, "padded tokens must not count"


def test_sparsity_skips_layers_with_no_more_experts_than_k_and_non_sparsegen():
    rec = record(torch.zeros(1, 2, 2), router="sparsegen", scores=torch.randn(1, 2, 2), lam=torch.zeros(1, 2))
    assert sparsity_loss([rec], 2).item() == 0.0
    assert sparsity_loss([record([[[0.5, 0.5]]], router="softmax")], 1).item() == 0.0
    with pytest.raises(ValueError, match="sparsity_k"):
        sparsity_loss([rec], 0)


def test_router_z_loss_hand_computed():
    rec = record(torch.zeros(1, 1, 2), scores=[[[0.0, 0.0]]])
    assert router_z_loss([rec]).item() == pytest.approx(math.log(2) ** 2)


def test_l1_and_zero_activation_counting_for_relu():
    rec = record([[[0.0, 0.0, 0.0], [0.5, 0.0, 1.5]]], router="relu")
    assert l1_penalty([rec]).item() == pytest.approx(1.0)
    # active fractions: token1 0/3, token2 2/3 -> mean 1/3
    assert active_expert_fraction([rec]).item() == pytest.approx(1 / 3)


def test_remole_controller_moves_coefficient_toward_target():
    controller = ReMoLEL1Controller(target_k=2, num_experts=8)  # target sparsity 0.75
    dense = record(torch.ones(1, 4, 8), router="relu")  # sparsity 0 < 0.75 -> raise c
    assert controller.update([dense]).item() == pytest.approx(1e-8 * 1.2)
    sparse = record(torch.zeros(1, 4, 8), router="relu")  # sparsity 1 > 0.75 -> lower c
    controller.update([sparse])
    controller.update([sparse])
    assert controller.coefficient.item() == pytest.approx(1e-8 / 1.2)
    restored = ReMoLEL1Controller(target_k=1, num_experts=4)
    restored.load_state_dict(controller.state_dict())
    assert restored.coefficient.item() == controller.coefficient.item() and restored.target_sparsity == 0.75
    penalty = controller.penalty([dense])
    assert penalty.item() == pytest.approx(controller.coefficient.item() * 8)
    with pytest.raises(ValueError, match="top_k"):
        ReMoLEL1Controller(target_k=9, num_experts=8)
