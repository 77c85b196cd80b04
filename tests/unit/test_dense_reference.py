"""MoLELinear against the reference release's dense-einsum formulation (``ldmole.core.dense_reference``; PEFT
for router=lora): same outputs and gradients for every router, in evaluation and in training mode (dropout
with the same mask, either router input), and a check that notices different weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldmole import LambdaMLP, MoLEConfig, MoLELinear
from ldmole.core.dense_reference import DenseEinsumMoLE, dense_twin
from tests.reference_mole import EquivalenceError, check_equivalence, peft_twin

ROUTED = ("sparsegen", "sparsegen_fixed", "topk", "relu", "softmax")
D_IN, D_OUT, TOKENS, EXPERTS, RANK, ALPHA = 32, 48, 16, 4, 2, 16.0


def make_layer(router: str, dropout: float = 0.1, router_input: str = "x") -> MoLELinear:
    """A tiny ``MoLELinear`` (live λ-MLP) with B non-zero so that the comparison means something."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False).requires_grad_(False)
    if router == "lora":
        config = MoLEConfig(router="lora", num_experts=1, r=EXPERTS * RANK, alpha=ALPHA * EXPERTS, dropout=dropout)
        layer = MoLELinear(base, config, num_experts=1)
    else:
        mlp = LambdaMLP(D_IN, 256) if router == "sparsegen" else None
        config = MoLEConfig(router=router, num_experts=EXPERTS, r=RANK, alpha=ALPHA, dropout=dropout, top_k=2,
                            fixed_lambda=0.5, router_input=router_input)
        layer = MoLELinear(base, config, num_experts=EXPERTS, lambda_mlp=mlp)
    with torch.no_grad():
        for e in range(layer.num_experts):
            nn.init.kaiming_uniform_(layer.lora_B[e], a=math.sqrt(5))
    return layer


def make_twin(layer: MoLELinear) -> nn.Module:
    return peft_twin(layer) if layer.router_name == "lora" else dense_twin(layer)


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


@pytest.mark.parametrize("router_input", ["x", "dropout"])
@pytest.mark.parametrize("router", ROUTED + ("lora",))
def test_molelinear_matches_its_reference_in_training_mode_with_dropout(router, router_input):
    if router == "lora" and router_input == "dropout":
        pytest.skip("lora has no router")
    layer = make_layer(router, dropout=0.3, router_input=router_input)
    twin, x = make_twin(layer), inputs()
    errors = check_equivalence(layer, twin, x, tol=1e-4, training=True, seed=7)
    assert max(errors.values()) < 1e-4
    # the comparison sees the dropout: another mask for the twin makes the two disagree
    layer.train(), twin.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ours = layer(x) - layer.base_layer(x)
        torch.manual_seed(8)
        theirs = twin(x) - layer.base_layer(x)
    assert not torch.allclose(ours, theirs, atol=1e-3)


def test_dense_reference_builds_the_layers_weights_from_the_same_seed():
    config = MoLEConfig(router="softmax", num_experts=EXPERTS, r=RANK, dropout=0.0)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    torch.manual_seed(3)
    layer = MoLELinear(base, config, num_experts=EXPERTS)
    torch.manual_seed(3)
    dense = DenseEinsumMoLE(base, config, num_experts=EXPERTS)
    assert sorted(dense.state_dict()) == sorted(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(dense.state_dict()[name], value), name
    with pytest.raises(ValueError, match="routed MoLEConfig.router"):
        DenseEinsumMoLE(base, MoLEConfig(router="lora", num_experts=1), num_experts=1)


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
