"""`DenseEinsumMoLE`: the reference release's dense formulation of a MoLE layer, to check and time `MoLELinear`.

Written from the reference release's description, independently of ``MoLELinear``'s fused
rank-(E·r) form: every expert's full output ``[B, S, E, d_out]`` is built and mixed with the routing
weights. The routing goes through the same registered ``Router`` classes (so a twin can hold a copy of a
layer's router); nothing of ``MoLELinear``'s expert computation is used. The tests check that
``MoLELinear`` computes the same outputs and gradients; ``ldmole-bench-layer`` times both.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from .config import MoLEConfig
from .lambda_mlp import LambdaMLP
from .layer import MoLELinear
from .routers import LORA, get_router, validate_mole_config

__all__ = ["DenseEinsumMoLE", "dense_twin"]


class DenseEinsumMoLE(nn.Module):
    """Mixture of LoRA experts computed densely, as the reference release does.

    out = base(x) + (alpha / r) * einsum("bsno,bsn->bso", y, p) with
    y = einsum("bsnr,nro->bsno", einsum("bsni,nir->bsnr", dropout(x) expanded to [B, S, E, d_in], A), B)
    (a [B, S, E, d_out] tensor) and p = router(x) in float32 (or router(dropout(x)) with
    ``config.router_input="dropout"``). The dropout mask is drawn once, on the input, before routing, as in
    ``MoLELinear``, so both draw the same mask from the same random state.

    Args:
        base_layer: the frozen ``nn.Linear`` (d_in -> d_out).
        config: a ``MoLEConfig`` with a routed ``router`` (not ``"lora"``); checked here.
        num_experts: E.
        lambda_mlp: the λ predictor for routers with a learned λ (held by reference, its cache cleared
            after every forward).

    Parameters: ``lora_A [E, r, d_in]`` (kaiming-uniform per expert), ``lora_B [E, d_out, r]`` (zero),
    ``router`` (the registered ``Router``): the names, shapes and initial values (same seed) of
    ``MoLELinear``'s, so the state dict of one loads into the other. Shapes: ``x [B, S, d_in] -> [B, S, d_out]``.
    """

    def __init__(self, base_layer: nn.Linear, config: MoLEConfig, *, num_experts: int,
                 lambda_mlp: Optional[LambdaMLP] = None) -> None:
        super().__init__()
        if config.router == LORA:
            raise ValueError("DenseEinsumMoLE needs a routed MoLEConfig.router, not 'lora' (one expert, no router)")
        validate_mole_config(config)
        self.base_layer = base_layer
        self.config = config
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.r, self.scaling = num_experts, config.r, config.alpha / config.r
        self.router_input = config.router_input
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, self.r, device=device))
        self.router = get_router(config.router)(self.in_features, num_experts, config, lambda_mlp=lambda_mlp,
                                                device=device)
        # The random draws of MoLELinear, in its order: built from the same seed, both hold the same weights.
        with torch.no_grad():
            for expert in range(num_experts):
                nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
        self.router.reset_parameters()

    @property
    def lambda_mlp(self) -> Optional[LambdaMLP]:
        return self.router.lambda_mlp

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[B, S, E]`` (float32) of the router's input; clears the λ-MLP's cache."""
        _, weights, _ = self.router(x)
        if self.lambda_mlp is not None:
            self.lambda_mlp.clear_cache()
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x_drop = self.lora_dropout(x)
        x_experts = x_drop.unsqueeze(-2).expand(*x_drop.shape[:-1], self.num_experts, self.in_features)
        hidden = torch.einsum("bsni,nir->bsnr", x_experts, self.lora_A.transpose(1, 2))
        expert_out = torch.einsum("bsnr,nro->bsno", hidden, self.lora_B.transpose(1, 2))  # [B, S, E, d_out]
        weights = self.routing_weights(x_drop if self.router_input == "dropout" else x)
        update = torch.einsum("bsno,bsn->bso", expert_out, weights.to(expert_out.dtype))
        return result + (update * self.scaling).to(result.dtype)


def dense_twin(layer: MoLELinear) -> DenseEinsumMoLE:
    """A :class:`DenseEinsumMoLE` on the same base and config as ``layer``, holding a copy of its weights
    (and of its λ-MLP), so the two compute the same thing two ways."""
    if layer.lambda_mlp is not None:
        layer.lambda_mlp.clear_cache()  # the cache may hold a graph's tensor, which cannot be copied
    twin = DenseEinsumMoLE(layer.base_layer, layer.config, num_experts=layer.num_experts,
                           lambda_mlp=copy.deepcopy(layer.lambda_mlp))
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
        twin.lora_B.copy_(layer.lora_B)
    twin.router.load_state_dict(layer.router.state_dict())
    return twin
