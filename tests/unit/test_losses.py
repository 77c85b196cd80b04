"""Routing losses on hand-computed examples: load balance, sparsity hinge, z-loss, ReMoLE L1 controller."""

from __future__ import annotations

import math

import pytest
import torch

from ldmole import (ReMoLEL1Controller, RoutingRecord, active_expert_fraction, balanced_l1_penalty, get_router,
                    l1_penalty, load_balance_loss, router_z_loss, sparsity_loss)
from ldmole.core.sparsegen import lambda_bounds, sparsegen


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
    # The naive form f = 1/E is the constant 1 whatever the routing; the package's loss must follow the routing.
    assert loss.item() != pytest.approx(1.0), "the load-balance loss must not be the naive constant 1"
    other = torch.tensor([[[0.0, 4.0, -1.0], [0.1, 3.0, 0.2]]])  # both tokens now choose expert 1, more surely
    moved = record(torch.softmax(other, -1), router="softmax")
    assert load_balance_loss([moved]).item() == pytest.approx(3 * moved.weights[..., 1].mean().item())
    assert load_balance_loss([moved]).item() != pytest.approx(loss.item())


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
    # A record with a λ whose hinge is positive: zero only because its router is not Sparsegen.
    scores, lam = [[[0.5, 0.4, 0.3, 0.2]]], [[0.0]]  # k=1: lower = 1 - (0.5 - 0.4) = 0.9 > λ = 0
    hinged = record(torch.zeros(1, 1, 4), router="sparsegen", scores=scores, lam=lam)
    assert sparsity_loss([hinged], 1).item() == pytest.approx(0.9), "sanity: the same record under Sparsegen"
    softmax = record(torch.zeros(1, 1, 4), router="softmax", scores=scores, lam=lam)
    assert softmax.lam is not None
    assert sparsity_loss([softmax], 1).item() == 0.0
    with pytest.raises(ValueError, match="sparsity_loss: k=0 must be >= 1"):
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
    controller = ReMoLEL1Controller(target_k=2)  # 8 experts below: target sparsity 0.75
    dense = record(torch.ones(1, 4, 8), router="relu")  # sparsity 0 < 0.75 -> raise c
    controller.observe([dense])
    assert controller.update().item() == pytest.approx(1e-8 * 1.2)
    sparse = record(torch.zeros(1, 4, 8), router="relu")  # sparsity 1 > 0.75 -> lower c
    for _ in range(2):
        controller.observe([sparse])
        controller.update()
    assert controller.coefficient.item() == pytest.approx(1e-8 / 1.2)
    restored = ReMoLEL1Controller(target_k=1, form="plain")
    restored.load_state_dict(controller.state_dict())
    assert restored.coefficient.item() == controller.coefficient.item()
    assert (restored.target_k, restored.form) == (2, "balanced")
    # balanced form on all-ones weights: P_e = 1, n_e = N = 4 -> 8 * Σ_e 1 * 4 / (4 * 2) = 32
    assert controller.penalty([dense]).item() == pytest.approx(controller.coefficient.item() * 32)
    assert ReMoLEL1Controller(2, form="plain").penalty([dense]).item() == pytest.approx(1e-8 * 8)
    for kwargs, key in ((dict(target_k=0), "target_k=0 .*MoLEConfig.top_k"), (dict(target_k=2, rate=1.0), "rate=1.0"),
                        (dict(target_k=2, initial=0.0), "initial=0.0"),
                        (dict(target_k=2, form="l2"), "form='l2'")):
        with pytest.raises(ValueError, match=key):
            ReMoLEL1Controller(**kwargs)


def test_remole_controller_targets_each_modules_own_expert_count():
    # k = 2. A 2-expert module with both experts on is at its target (sparsity 0 = 1 - 2/2); an
    # 8-expert module with 1 expert on is sparser than its target (7/8 > 3/4): the mean gap is
    # +1/16, so c must go down. A single target from the largest E (0.75) would see a mean
    # sparsity of 7/16 and raise c instead.
    small = record(torch.ones(1, 3, 2), router="relu")
    large = record(torch.nn.functional.one_hot(torch.tensor([[0, 3, 5]]), 8).float(), router="relu")
    controller = ReMoLEL1Controller(target_k=2)
    controller.observe([small, large])
    assert controller.update().item() == pytest.approx(1e-8 / 1.2)


def test_remole_controller_averages_the_steps_micro_batches_and_updates_once():
    # micro-batch 1: gap 2/8 - 1 = -0.75; micro-batch 2: gap 2/8 - 0 = +0.25 -> mean -0.25 < 0: one raise.
    # Updating from the last micro-batch alone would lower c.
    controller = ReMoLEL1Controller(target_k=2)
    controller.observe([record(torch.ones(1, 2, 8), router="relu")])
    controller.observe([record(torch.zeros(1, 2, 8), router="relu")])
    assert controller.update().item() == pytest.approx(1e-8 * 1.2)
    with pytest.raises(RuntimeError, match="observe"):
        controller.update()
    # the step's gap is averaged over processes through `reduce` (here another process's +1 outweighs -0.25)
    controller.observe([record(torch.ones(1, 2, 8), router="relu")])
    controller.observe([record(torch.zeros(1, 2, 8), router="relu")])
    assert controller.update(reduce=lambda gap: (gap + 1.0) / 2).item() == pytest.approx(1e-8)


def test_remole_controller_ignores_padded_tokens_in_the_sparsity():
    # real token: 1 of 8 experts (sparsity 7/8 > 3/4 -> lower c); the padded token is fully dense.
    weights = torch.zeros(1, 2, 8)
    weights[0, 0, 0] = 1.0
    weights[0, 1] = 1.0
    controller = ReMoLEL1Controller(target_k=2)
    controller.observe([record(weights, router="relu", mask=[[True, False]])])
    assert controller.update().item() == pytest.approx(1e-8 / 1.2)


def test_balanced_l1_matches_remoe_formula_by_hand():
    # 3 tokens (the last padded, with large weights), 3 experts, k = 2.
    weights = [[[0.5, 0.0, 1.0], [0.0, 0.0, 2.0], [9.0, 9.0, 9.0]]]
    rec = record(weights, router="relu", mask=[[True, True, False]])
    # real tokens N = 2: column sums of p = [0.5, 0, 3], counts n = [1, 0, 2]
    # E Σ_e (Σ_t p_te / N) n_e / (N k) = 3 * (0.5/2 * 1 + 0 + 3/2 * 2) / (2 * 2) = 3 * 3.25 / 4
    expected = 3 * (0.25 * 1 + 1.5 * 2) / 4
    assert balanced_l1_penalty([rec], target_k=2).item() == pytest.approx(expected)
    # gradient: d/dp_te = E n_e / (N² k) on real tokens, 0 on the padded one (n_e carries no gradient)
    leaf = torch.tensor(weights, requires_grad=True)
    rec.weights = leaf
    balanced_l1_penalty([rec], target_k=2).backward()
    row = [3 * n / (2 * 2 * 2) for n in (1, 0, 2)]
    torch.testing.assert_close(leaf.grad, torch.tensor([[row, row, [0.0, 0.0, 0.0]]]))
    # averaged over ReLU modules; other routers are skipped
    plain_only = record([[[1.0, 0.0, 0.0]]], router="relu")  # N=1, n=[1,0,0]: 3 * 1 * 1 / 2 = 1.5
    assert balanced_l1_penalty([rec, plain_only, record(weights)], 2).item() == pytest.approx((expected + 1.5) / 2)


def test_load_balance_softmax_probs_is_molas_form():
    # MoLA: f_i = top-k selections of expert i / all selections, P_i = mean full-softmax probability.
    scores = [[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 5.0, 5.0]]]
    mask = [[True, True, False]]
    rec = record(get_router("topk").route_scores(torch.tensor(scores), top_k=2), router="topk", scores=scores, mask=mask)
    real = scores[0][:2]
    softmax = [[math.exp(u) / sum(math.exp(v) for v in row) for u in row] for row in real]
    p_mean = [sum(row[i] for row in softmax) / 2 for i in range(3)]
    chosen = [sorted(range(3), key=lambda i: -row[i])[:2] for row in real]  # token 1: {0, 1}; token 2: {1, 2}
    f = [sum(i in c for c in chosen) / 4 for i in range(3)]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p_mean))
    assert load_balance_loss([rec], probs="softmax").item() == pytest.approx(expected)
    kept = [[row[i] / sum(row[j] for j in c) if i in c else 0.0 for i in range(3)] for row, c in zip(softmax, chosen)]
    renormalised = 3 * sum(f[i] * sum(row[i] for row in kept) / 2 for i in range(3))
    assert load_balance_loss([rec]).item() == pytest.approx(renormalised), "the default keeps P from the top-k weights"
    assert abs(renormalised - expected) > 0.02
    # other routers keep their weights as P
    soft = record(torch.softmax(torch.tensor(scores), -1), router="sparsegen", scores=torch.zeros(1, 3, 3))
    assert load_balance_loss([soft], probs="softmax").item() == pytest.approx(load_balance_loss([soft]).item())
    with pytest.raises(ValueError, match="probs='logits' is unknown"):
        load_balance_loss([rec], probs="logits")


def test_router_z_loss_ignores_padded_tokens():
    rec = record(torch.zeros(1, 2, 2), scores=[[[0.0, 0.0], [50.0, 50.0]]], mask=[[True, False]])
    assert router_z_loss([rec]).item() == pytest.approx(math.log(2) ** 2)


def test_active_expert_fraction_ignores_padded_tokens():
    rec = record([[[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]], router="relu",
                 mask=[[True, False, False]])
    assert active_expert_fraction([rec]).item() == pytest.approx(0.25)


def test_the_sparsity_hinge_is_zero_exactly_when_at_most_k_experts_are_active():
    torch.manual_seed(0)
    scores = torch.randn(4000, 8)
    lam = torch.empty(4000).uniform_(-4.0, 0.99)
    active = (sparsegen(scores, lam) > 0).sum(-1)
    for k in (1, 2, 3, 5):
        lower, _ = lambda_bounds(scores, k)
        hinge = torch.relu(lower - lam)
        assert torch.equal(hinge == 0, active <= k), f"k={k}: hinge zero must mean at most k active experts"
        # Both sides occur, so the equivalence is not met by one side alone.
        assert 0 < int((active <= k).sum()) < len(active)
        # The loss of a record is zero exactly when every token keeps at most k experts.
        for rows in (active <= k).nonzero().flatten()[:50], torch.arange(len(active)):
            record = RoutingRecord("m", 0, "q_proj", "sparsegen", scores[rows], sparsegen(scores[rows], lam[rows]),
                                   lam[rows], None)
            zero = bool(sparsity_loss([record], k) == 0)
            assert zero == bool((active[rows] <= k).all())
