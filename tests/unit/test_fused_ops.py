"""The layer's two autograd Functions, checked by gradcheck (float64) and against autograd through the plain
expressions they replace, with the gradients each input must and must not receive: ``fused_linear`` (several
weights as one GEMM) and ``add_routed_update_`` (the experts' routed update, in place). And Sparsegen without
autograd: the same bits as its autograd Function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmole import sparsegen
from ldmole.core.fused_linear import fused_linear
from ldmole.core.routed_update import add_routed_update_


def leaves(*shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True) for shape in shapes]


def test_fused_linear_passes_gradcheck():
    x, w1, w2, w3, b = leaves((2, 3, 5), (2, 5), (4, 5), (3, 5), (9,))
    assert torch.autograd.gradcheck(lambda x, b, *ws: fused_linear(x, ws, b), (x, b, w1, w2, w3))


def test_fused_linear_matches_one_linear_over_the_concatenated_weights_in_value_and_gradients():
    x, w1, w2 = leaves((4, 6), (3, 6), (5, 6), dtype=torch.float32)
    g = torch.randn(4, 8)
    fused = fused_linear(x, [w1, w2])
    grads = torch.autograd.grad((fused * g).sum(), (x, w1, w2))
    plain = F.linear(x, torch.cat([w1, w2]))
    expected = torch.autograd.grad((plain * g).sum(), (x, w1, w2))
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_linear_gives_no_gradient_to_a_weight_that_needs_none():
    x, w1 = leaves((4, 6), (3, 6))
    frozen = torch.randn(2, 6, dtype=torch.float64)
    out = fused_linear(x, [w1, frozen])
    out.sum().backward()
    assert frozen.grad is None and w1.grad is not None and x.grad is not None


def routed(result0, hidden, weights, lora_B, scaling=0.7):
    return add_routed_update_(result0.clone(), hidden, weights, lora_B, scaling)


def plain_routed(result0, hidden, weights, lora_B, scaling=0.7):
    tokens, experts, r = hidden.shape
    scaled = (hidden * weights.unsqueeze(-1)).reshape(tokens, experts * r)
    b_cat = lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], experts * r)
    return result0 + scaling * scaled @ b_cat.t()


def test_routed_update_passes_gradcheck():
    result0, hidden, weights, lora_B = leaves((5, 7), (5, 3, 2), (5, 3), (3, 7, 2))
    assert torch.autograd.gradcheck(routed, (result0, hidden, weights, lora_B))


def test_routed_update_matches_autograd_through_the_plain_expression():
    inputs = leaves((6, 7), (6, 4, 3), (6, 4), (4, 7, 3), dtype=torch.float32, seed=1)
    g = torch.randn(6, 7)
    out = routed(*inputs)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    plain = plain_routed(*inputs)
    expected = torch.autograd.grad((plain * g).sum(), inputs)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_routed_update_adds_into_result_in_place_and_reaches_only_its_inputs():
    result0, hidden, weights, lora_B = leaves((4, 5), (4, 2, 3), (4, 2), (2, 5, 3))
    unrelated = torch.randn(3, dtype=torch.float64, requires_grad=True)
    result = result0 * 1.0
    out = add_routed_update_(result, hidden, weights.detach(), lora_B, 0.5)
    assert out is result
    (out.sum() + 0 * unrelated.sum().detach()).backward()
    assert weights.grad is None, "a detached routing weight gets no gradient"
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (result0, hidden, lora_B))
    assert unrelated.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sparsegen_without_autograd_gives_the_bits_of_its_autograd_function(dtype):
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(300, 8, generator=gen) * 2).to(dtype)
    scores[::7, 1] = scores[::7, 0]  # ties
    lam = (torch.rand(300, generator=gen) * 3 - 2).to(dtype)
    lam[::11] = 0.99  # near 1 (bf16 would round 0.999 to 1, outside the domain)
    with torch.no_grad():
        without = sparsegen(scores, lam)
    with_grad = sparsegen(scores.clone().requires_grad_(True), lam)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert without.dtype == with_grad.dtype == dtype
    assert torch.equal(without, with_grad.detach())
