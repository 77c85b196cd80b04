"""Sparsegen: closed form vs sparsemax and an independent solver, properties, gradients, bounds."""

from __future__ import annotations

import pytest
import torch
from entmax import sparsemax

from ldmole import lambda_bounds, sparsegen


def project_by_bisection(u: torch.Tensor, lam: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Independent solver: find τ with Σ max(0, (u - τ)/(1-λ)) = 1 by bisection (float64)."""
    z = u / (1 - lam[..., None])
    lo = z.max(-1, keepdim=True).values - 1.0
    hi = z.max(-1, keepdim=True).values
    for _ in range(iters):
        mid = (lo + hi) / 2
        total = torch.clamp(z - mid, min=0).sum(-1, keepdim=True)
        lo = torch.where(total > 1, mid, lo)
        hi = torch.where(total > 1, hi, mid)
    return torch.clamp(z - (lo + hi) / 2, min=0)


def random_case(shape=(6, 5), num_experts=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape, num_experts, generator=gen, dtype=dtype) * 2
    lam = torch.rand(*shape, generator=gen, dtype=dtype) * 3 - 2  # in [-2, 1)
    return u, lam


@pytest.mark.parametrize("seed", range(5))
def test_sparsegen_matches_sparsemax_of_scaled_scores(seed):
    u, lam = random_case(seed=seed)
    expected = sparsemax(u / (1 - lam[..., None]), dim=-1)
    torch.testing.assert_close(sparsegen(u, lam), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_sparsegen_matches_bisection_projection(seed):
    u, lam = random_case(seed=seed, num_experts=11)
    torch.testing.assert_close(sparsegen(u, lam), project_by_bisection(u, lam), atol=1e-9, rtol=0)


def test_lam_accepts_trailing_singleton_and_decode_shape():
    u, lam = random_case(shape=(3, 1))
    torch.testing.assert_close(sparsegen(u, lam), sparsegen(u, lam[..., None]))
    assert sparsegen(u, lam).shape == (3, 1, 8)


def test_simplex_and_at_least_one_expert_for_any_lambda_below_one():
    u = torch.randn(2000, 8, dtype=torch.float64)
    lam = torch.cat([torch.full((500,), 0.999999), torch.linspace(-50, 0.99, 1500)]).double()
    p = sparsegen(u, lam)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2000, dtype=torch.float64))
    assert ((p > 0).sum(-1) >= 1).all(), "every token must keep at least one expert"


def test_limits_one_hot_near_one_and_uniform_at_minus_infinity():
    u = torch.tensor([[0.3, 1.2, -0.5, 0.9]], dtype=torch.float64)
    one_hot = sparsegen(u, torch.tensor([1 - 1e-9], dtype=torch.float64))
    torch.testing.assert_close(one_hot, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    uniform = sparsegen(u, torch.tensor([-1e12], dtype=torch.float64))
    torch.testing.assert_close(uniform, torch.full((1, 4), 0.25, dtype=torch.float64))


def test_ties_share_weight_equally():
    u = torch.tensor([[1.0, 1.0, 0.0, -3.0]], dtype=torch.float64)
    p = sparsegen(u, torch.tensor([0.5], dtype=torch.float64))
    assert p[0, 0] == p[0, 1] and p[0, 0] > 0
    torch.testing.assert_close(p, sparsemax(u / 0.5, dim=-1))


def test_gradcheck_float64_scores_and_lambda():
    u, lam = random_case(shape=(4, 3), num_experts=6, seed=3)
    u.requires_grad_(True)
    lam.requires_grad_(True)
    assert torch.autograd.gradcheck(sparsegen, (u, lam))
    lam_col = lam.detach()[..., None].requires_grad_(True)
    assert torch.autograd.gradcheck(sparsegen, (u, lam_col))


def test_backward_matches_autograd_through_sparsemax():
    u, lam = random_case(seed=7)
    u1, lam1 = u.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    u2, lam2 = u.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    weight = torch.randn_like(u)
    (sparsegen(u1, lam1) * weight).sum().backward()
    (sparsemax(u2 / (1 - lam2[..., None]), dim=-1) * weight).sum().backward()
    torch.testing.assert_close(u1.grad, u2.grad)
    torch.testing.assert_close(lam1.grad, lam2.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_finite_and_returned_in_input_dtype(dtype):
    u, lam = random_case(dtype=torch.float32)
    u_half = (u * 30).to(dtype).requires_grad_(True)
    p = sparsegen(u_half, lam.to(dtype))
    assert p.dtype == dtype and torch.isfinite(p).all()
    torch.testing.assert_close(p.float().sum(-1), torch.ones(6, 5), atol=2e-2, rtol=0)
    p.float().pow(2).sum().backward()
    assert torch.isfinite(u_half.grad.float()).all()


def test_float64_stays_float64_and_float32_stays_float32():
    for dtype in (torch.float32, torch.float64):
        u, lam = random_case(dtype=dtype)
        assert sparsegen(u, lam).dtype == dtype


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_lambda_inside_bounds_gives_exactly_k_experts(k):
    u = torch.randn(500, 8, dtype=torch.float64)
    lower, upper = lambda_bounds(u, k)
    assert (lower <= upper).all()
    for t in (0.0, 0.3, 0.999):
        lam = lower + t * (upper - lower)
        counts = (sparsegen(u, lam) > 0).sum(-1)
        assert (counts == k).all(), f"λ inside [lower, upper) must give exactly {k} experts"
    at_lower = (sparsegen(u, lower) > 0).sum(-1)
    assert (at_lower <= k).all(), f"λ = lower must give at most {k} experts"
    above = (sparsegen(u, torch.maximum(lower, torch.full_like(lower, 0.95))) > 0).sum(-1)
    assert (above <= k).all()


def test_lambda_bounds_k_equal_e_has_no_lower_bound_and_bad_k_raises():
    u = torch.randn(3, 4)
    lower, _ = lambda_bounds(u, 4)
    assert torch.isinf(lower).all() and (lower < 0).all()
    with pytest.raises(ValueError, match="k=5"):
        lambda_bounds(u, 5)


def test_nan_inputs_propagate_instead_of_failing():
    u = torch.tensor([[0.1, float("nan"), 0.3], [0.2, 0.1, 0.0]])
    p = sparsegen(u, torch.tensor([0.5, float("nan")]))
    assert torch.isnan(p).any(dim=-1).all(), "NaN scores or λ must surface as NaN weights for the loss checks"


def test_lambda_lower_bound_is_the_lower_of_lambda_bounds_bit_for_bit():
    from ldmole.core.sparsegen import lambda_lower_bound

    scores = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    for k in range(1, 8):
        assert torch.equal(lambda_lower_bound(scores, k), lambda_bounds(scores, k)[0])
