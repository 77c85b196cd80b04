"""MoLELinear against the reference release's dense-einsum formulation (and PEFT for router=lora):
same outputs and gradients for every router, and a check that notices different weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldmole import LambdaMLP, MoLELinear
from tests.reference_mole import EquivalenceError, check_equivalence, dense_twin, peft_twin

ROUTED = ("sparsegen", "sparsegen_fixed", "topk", "relu", "softmax")
D_IN, D_OUT, TOKENS, EXPERTS, RANK, ALPHA = 32, 48, 16, 4, 2, 16.0


def make_layer(router: str) -> MoLELinear:
    """A tiny ``MoLELinear`` (dropout 0.1, live λ-MLP) with B non-zero so that the comparison means something."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False).requires_grad_(False)
    if router == "lora":
        layer = MoLELinear(base, 1, EXPERTS * RANK, alpha=ALPHA * EXPERTS, dropout=0.1, router="lora")
    else:
        mlp = LambdaMLP(D_IN, 256) if router == "sparsegen" else None
        layer = MoLELinear(base, EXPERTS, RANK, alpha=ALPHA, dropout=0.1, router=router, top_k=2, lambda_mlp=mlp,
                           fixed_lambda=0.5)
    with torch.no_grad():
        for e in range(layer.num_experts):
            nn.init.kaiming_uniform_(layer.lora_B[e], a=math.sqrt(5))
    return layer


def make_twin(layer: MoLELinear) -> nn.Module:
    return peft_twin(layer) if layer.router_kind == "lora" else dense_twin(layer)


def inputs() -> torch.Tensor:
    return torch.randn(1, TOKENS, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("router", ROUTED + ("lora",))
def test_molelinear_matches_its_reference_in_outputs_and_gradients(router):
    layer = make_layer(router)
    errors = check_equivalence(layer, make_twin(layer), inputs(), tol=1e-4)
    assert errors and max(errors.values()) < 1e-4
    assert {"adapter_output", "x.grad", "lora_A.grad", "lora_B.grad"} <= set(errors)
    if router != "lora":
        assert "router.grad" in errors
    if router == "sparsegen":
        assert "lambda_mlp.fc1.grad" in errors


@pytest.mark.parametrize("router,perturb", [
    ("sparsegen", "lora_B"), ("sparsegen", "router"), ("sparsegen", "lambda"), ("softmax", "lora_A"),
    ("topk", "lora_B"), ("lora", "lora_B"),
])
def test_equivalence_check_fails_on_different_weights(router, perturb):
    layer = make_layer(router)
    twin = make_twin(layer)
    x = inputs()
    assert max(check_equivalence(layer, twin, x, tol=1e-4).values()) < 1e-4

    with torch.no_grad():
        if perturb == "lambda":
            target = twin.lambda_mlp.fc1.weight
        elif perturb == "router":
            target = twin.router.weight
        elif router == "lora":
            target = getattr(twin, perturb)["default"].weight
        else:
            target = getattr(twin, perturb)
        target.add_(0.05 * torch.randn_like(target))
    with pytest.raises(EquivalenceError, match="disagree"):
        check_equivalence(layer, twin, x, tol=1e-4)


def test_equivalence_check_refuses_a_void_comparison():
    layer = make_layer("softmax")
    with torch.no_grad():
        layer.lora_B.zero_()
    with pytest.raises(EquivalenceError, match="void"):
        check_equivalence(layer, make_twin(layer), inputs())
