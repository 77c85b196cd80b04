"""`MoLELinear`: a frozen ``nn.Linear`` plus E routed LoRA experts, returning a plain tensor."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoLEConfig
from .lambda_mlp import LambdaMLP
from .records import RoutingContext, RoutingRecord
from .routers import LORA, get_router

__all__ = ["MoLELinear"]


class MoLELinear(nn.Module):
    """out = base_layer(x) + (alpha / r) Σ_e p_e B_e A_e dropout(x), with p = router(x).

    The experts run as one rank-(E·r) LoRA whose hidden units are scaled by the routing weights:
    h = A_cat dropout(x) ([..., E·r]), h_e *= p_e, out += (alpha/r) B_cat h. No [tokens, E, d_out]
    tensor is ever built. Router scores, routing and λ are computed in float32 (also under
    autocast) from the module input x (or dropout(x), ``router_input``); the experts see dropout(x).
    Routing uses no host sync.

    Args:
        base_layer: the frozen ``nn.Linear`` (d_in -> d_out) being adapted.
        num_experts: E (1 with ``router="lora"``).
        r: rank of each expert.
        alpha: LoRA alpha (scaling alpha / r).
        dropout: dropout probability on the experts' input.
        router: a registered router name (``MoLEConfig.router``); ``"lora"`` means one expert and no router.
        top_k: ``MoLEConfig.top_k`` (experts per token for ``router="topk"``).
        lambda_mlp: the shared λ predictor for routers with a learned λ (``router="sparsegen"``). It
            is owned by the model (registered once, not under every layer) so the router only holds
            a reference.
        fixed_lambda: ``MoLEConfig.fixed_lambda`` (λ for ``router="sparsegen_fixed"``).
        name, layer_index: identify the layer in routing records.
        router_input: ``"x"`` (router and λ-MLP read the module input) or ``"dropout"`` (they read
            the experts' dropout(x), as the reference release; identical at evaluation).

    The settings are validated as a ``MoLEConfig`` (errors name its fields), so a layer built on its
    own is checked by the same code as a model.

    Parameters: ``lora_A [E, r, d_in]`` (kaiming-uniform per expert), ``lora_B [E, d_out, r]`` (zero,
    so the model starts as the base model), ``router``: the registered ``Router`` (its gating weight
    ``router.weight [E, d_in]``; None for lora). Adapter parameters are float32 whatever the base dtype.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        router: str = "sparsegen",
        top_k: int = 2,
        lambda_mlp: Optional[LambdaMLP] = None,
        fixed_lambda: Optional[float] = None,
        name: str = "",
        layer_index: int = 0,
        router_input: str = "x",
    ) -> None:
        super().__init__()
        settings = MoLEConfig(router=router, num_experts=num_experts, top_k=top_k, r=r, alpha=alpha, dropout=dropout,
                              fixed_lambda=fixed_lambda, router_input=router_input)
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        self.router_kind = router
        self.router_input = router_input
        self.name = name
        self.layer_index = layer_index
        self.module_type = name.rsplit(".", 1)[-1] if name else "linear"
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, device=device))
        self.router = None if router == LORA else get_router(router)(
            self.in_features, num_experts, settings, lambda_mlp=lambda_mlp, device=device)
        self.routing_context = RoutingContext(standalone=True)
        if self.lambda_mlp is not None:
            self.routing_context.lambda_mlps.append(self.lambda_mlp)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """A_e kaiming-uniform(a=√5) with fan-in d_in, B_e = 0, then the router's own reset."""
        with torch.no_grad():
            for expert in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
            self.lora_B.zero_()
        if self.router is not None:
            self.router.reset_parameters()

    @property
    def lambda_mlp(self) -> Optional[LambdaMLP]:
        return self.router.lambda_mlp if self.router is not None else None

    def extra_repr(self) -> str:
        return f"router={self.router_kind}, num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [..., E] (float32); stores the layer's routing record."""
        scores, weights, lam = self.router(x)
        ctx = self.routing_context
        ctx.add(RoutingRecord(self.name, self.layer_index, self.module_type, self.router_kind,
                              scores, weights, lam, ctx.token_mask(scores)))
        if ctx.standalone and self.lambda_mlp is not None:
            self.lambda_mlp.clear_cache()
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x_drop = self.lora_dropout(x)
        dtype = x_drop.dtype
        lora_A = self.lora_A.to(dtype)
        lora_B = self.lora_B.to(dtype)
        if self.router is None:
            hidden = F.linear(x_drop, lora_A[0])
            b_cat = lora_B[0]
        else:
            weights = self._route(x_drop if self.router_input == "dropout" else x)
            hidden = F.linear(x_drop, lora_A.reshape(self.num_experts * self.r, self.in_features))
            hidden = hidden.unflatten(-1, (self.num_experts, self.r)) * weights.unsqueeze(-1).to(hidden.dtype)
            hidden = hidden.flatten(-2)
            b_cat = lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_experts * self.r)
        # One fused result + scaling * hidden @ B_cat^T: no separate [tokens, d_out] update tensor.
        flat = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]).to(result.dtype),
                           b_cat.t().to(result.dtype), alpha=self.scaling)
        return flat.view(result.shape)
