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
from .routers import LORA, get_router, validate_mole_config

__all__ = ["MoLELinear"]


class MoLELinear(nn.Module):
    """out = base_layer(x) + (alpha / r) Σ_e p_e B_e A_e dropout(x), with p = router(x).

    The experts run as one rank-(E·r) LoRA whose hidden units are scaled by the routing weights:
    h = A_cat dropout(x) ([..., E·r]), h_e *= p_e, out += (alpha/r) B_cat h. No [tokens, E, d_out]
    tensor is ever built. Router scores, routing and λ are computed in float32 (also under
    autocast) from the module input x (or dropout(x), ``config.router_input``); the experts see
    dropout(x). Routing uses no host sync.

    Every setting comes from ``config`` (as PEFT's layers take their ``LoraConfig``): ``r``, ``alpha``,
    ``dropout``, ``router``, ``router_input``, and whatever the router reads (``top_k``, ``fixed_lambda``,
    ``router_options``). ``get_mole_model`` checks the config once per model and passes ``validated=True``;
    a layer built on its own checks it (``validate_mole_config``) and that ``num_experts`` is one of the
    counts ``config.num_experts`` names.

    Args:
        base_layer: the frozen ``nn.Linear`` (d_in -> d_out) being adapted.
        config: the ``MoLEConfig`` (kept as ``self.config``; one object shared by a model's layers).
        num_experts: E of this layer (1 with ``router="lora"``); a per-layer count of ``config.num_experts``.
        name, layer_index: identify the layer in routing records.
        lambda_mlp: the shared λ predictor for routers with a learned λ (``router="sparsegen"``). It
            is owned by the model (registered once, not under every layer) so the router only holds
            a reference.
        validated: ``config`` was already checked by ``validate_mole_config`` (get_mole_model).

    Parameters: ``lora_A [E, r, d_in]`` (kaiming-uniform per expert), ``lora_B [E, d_out, r]`` (zero,
    so the model starts as the base model), ``router``: the registered ``Router`` (its gating weight
    ``router.weight [E, d_in]``; None for lora). Adapter parameters are float32 whatever the base dtype.
    ``router_name`` is the ``MoLEConfig.router`` value (a string; ``router`` is the module).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        config: MoLEConfig,
        *,
        num_experts: int,
        name: str = "",
        layer_index: int = 0,
        lambda_mlp: Optional[LambdaMLP] = None,
        validated: bool = False,
    ) -> None:
        super().__init__()
        if not validated:
            validate_mole_config(config)
            counts = config.expert_counts()
            if num_experts not in counts:
                raise ValueError(f"num_experts={num_experts!r} is not a count of MoLEConfig.num_experts="
                                 f"{config.num_experts!r} (counts {counts}); build the config with this layer's count")
        self.base_layer = base_layer
        self.config = config
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.router_name = config.router
        self.router_input = config.router_input
        self.name = name
        self.layer_index = layer_index
        self.module_type = name.rsplit(".", 1)[-1] if name else "linear"
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, self.r, device=device))
        self.router = None if config.router == LORA else get_router(config.router)(
            self.in_features, num_experts, config, lambda_mlp=lambda_mlp, device=device)
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
        return f"router={self.router_name}, num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [..., E] (float32); stores the layer's routing record."""
        scores, weights, lam = self.router(x)
        ctx = self.routing_context
        ctx.add(RoutingRecord(self.name, self.layer_index, self.module_type, self.router_name,
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
