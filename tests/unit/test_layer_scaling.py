"""`MoLELinear` against the formula written out by hand: W0 x + b + (alpha / r) Σ_e p_e B_e A_e x."""

from __future__ import annotations

import pytest
import torch

from ldmole.core.config import MoLEConfig
from ldmole.core.layer import MoLELinear

D_IN, D_OUT, R, ALPHA = 6, 5, 2, 6.0  # alpha / r = 3, distinct from 1, alpha, r and r / alpha


def hand_output(base: torch.nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
    """W0 x + b + (ALPHA / R) Σ_e p_e B_e A_e x, one expert at a time, with alpha and r from the constants."""
    out = x @ base.weight.T + base.bias
    for expert in range(lora_A.shape[0]):
        update = x @ lora_A[expert].T @ lora_B[expert].T
        out = out + (ALPHA / R) * weights[..., expert : expert + 1] * update
    return out


@pytest.mark.parametrize("router, num_experts", [("lora", 1), ("softmax", 3), ("topk", 3)])
def test_layer_output_is_base_plus_alpha_over_r_times_routed_expert_sum(router, num_experts):
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT)
    config = MoLEConfig(router=router, num_experts=num_experts, r=R, alpha=ALPHA, top_k=2, dropout=0.0)
    layer = MoLELinear(base, config, num_experts=num_experts)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 4, D_IN)
    if router == "lora":
        weights = torch.ones(2, 4, 1)
    else:
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
        if router == "topk":
            top = probs.topk(2, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        weights = probs
    with torch.no_grad():
        expected = hand_output(base, layer.lora_A, layer.lora_B, weights, x)
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=f"{router}: expected W0 x + b + (alpha/r={ALPHA / R}) Σ p_e B_e A_e x")
