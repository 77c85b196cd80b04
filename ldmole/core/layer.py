"""`MoLELinear`: a frozen ``nn.Linear`` plus E routed LoRA experts, returning a plain tensor."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoLEConfig
from .fused_linear import fused_linear
from .lambda_mlp import LambdaMLP
from .records import RoutingContext
from .routed_update import add_routed_update_
from .routers import LORA, get_router, validate_mole_config

__all__ = ["MoLELinear"]


class MoLELinear(nn.Module):
    """out = base_layer(x) + (alpha / r) Σ_e p_e B_e A_e dropout(x), with p = router(x).

    The experts run as one rank-(E·r) LoRA whose hidden units are scaled by the routing weights:
    h = A_cat dropout(x) ([..., E·r]), h_e *= p_e, out += (alpha/r) B_cat h. No [tokens, E, d_out]
    tensor is ever built. Router scores, routing and λ are computed in float32 (also under
    autocast) from the module input x (or dropout(x), ``config.router_input``); the experts see
    dropout(x). Routing uses no host sync.

    Matrices that read the same input run as one GEMM (:meth:`_gate`): the router's W_g with the
    λ-MLP's first layer W1 (when this layer computes λ: the λ-MLP memo shares one λ between modules fed
    the same tensor, ``LambdaMLP.recall``), and the experts' A_cat too where the experts read the
    routing input (no dropout applied: evaluation, ``dropout=0``; or ``router_input="dropout"``) in
    float32, the routing dtype (``fused_linear``: the backward keeps the weights, not their concatenation). The
    base runs on the flattened tokens and the expert update is added into its output in place (one GEMM,
    ``add_routed_update_``: no copy of the output, and the backward keeps h, p and B, not B_cat or h ⊙ p).
    Without autograd (evaluation, generation) nothing is concatenated: each matrix has its own GEMM, Sparsegen
    runs without its autograd Function, and for at most r tokens (decoding) the update is a batched GEMM over
    the experts, which needs no copy of B. The layer keeps its routing tensors (``last_routing``) for the routing
    records while its context records; it has no other side effect, so it compiles (``torch.compile``) without
    a graph break.

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
        # (scores, weights, λ) of the last forward while the context records (RoutingContext.records).
        self.last_routing: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
        self.routing_context = RoutingContext(standalone=True)
        self.routing_context.layers.append(self)
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

    def _gate(self, route_in: torch.Tensor, experts_fused: bool
              ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Scores ``[..., E]``, λ ``[...]`` (None for routers without one) and, when ``experts_fused``, the
        experts' hidden ``A_cat route_in [..., E·r]``, all float32, from one GEMM over ``route_in`` whose rows
        are W_g, then W1 when this layer computes λ, then A_cat (with autograd; without, one GEMM each). Call
        with autocast off."""
        router, mlp = self.router, self.lambda_mlp
        lam = mlp.recall(route_in) if mlp is not None else None
        weight = router.weight.float()
        if not torch.is_grad_enabled():
            # Without autograd one GEMM saves nothing: copying the rows into one matrix costs more than it saves.
            x32 = route_in.float()
            scores = F.linear(x32, weight)
            if mlp is not None and lam is None:
                lam = mlp(x32)  # the float32 input already made (mlp(route_in) would convert a bf16 input again)
                mlp.remember(route_in, lam)
            elif mlp is None:
                lam = router.lam(route_in, scores)
            hidden = F.linear(x32, self.lora_A.reshape(self.num_experts * self.r, self.in_features).float()) \
                if experts_fused else None
            return scores, lam, hidden
        fuse_lambda = mlp is not None and lam is None and mlp.fusable
        blocks, bias = [weight], None
        if fuse_lambda:
            blocks.append(mlp.fc1.weight.float())
            bias = [weight.new_zeros(self.num_experts), mlp.fc1.bias.float()]  # x W^T + 0 is x W^T exactly
        if experts_fused:
            blocks.append(self.lora_A.reshape(self.num_experts * self.r, self.in_features).float())
            if bias is not None:
                bias.append(weight.new_zeros(self.num_experts * self.r))
        if len(blocks) == 1:
            outputs = [F.linear(route_in.float(), weight)]
        else:
            out = fused_linear(route_in.float(), blocks, None if bias is None else torch.cat(bias))
            outputs = list(out.split([block.shape[0] for block in blocks], dim=-1))
            if fuse_lambda:
                # The scores (routing records, losses) and the experts' hidden units (saved for the backward)
                # outlive the forward: copies of their columns, so that they do not keep the whole output, with
                # λ's H pre-activations, alive until the backward.
                outputs = [outputs[0].clone(), outputs[1]] + [o.clone() for o in outputs[2:]]
        scores = outputs.pop(0)
        if mlp is not None and lam is None:
            lam = mlp.lam_from_preactivation(outputs.pop(0)) if fuse_lambda else mlp(route_in)
            mlp.remember(route_in, lam)
        elif mlp is None:
            lam = router.lam(route_in, scores)
        return scores, lam, outputs.pop(0) if experts_fused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base runs on the flattened tokens, so that its output (not a view) takes the update in place.
        result = self.base_layer(x.reshape(-1, self.in_features))
        dropout_applies = self.config.dropout > 0 and self.lora_dropout.training
        x_drop = self.lora_dropout(x) if dropout_applies else x
        dtype = x_drop.dtype
        lora_A = self.lora_A.to(dtype)
        lora_B = self.lora_B.to(dtype)
        if self.router is None:
            # result += scaling * A dropout(x) @ B^T in place, one GEMM: no [tokens, d_out] update tensor and no copy
            # of the base output (which no one else holds: the base's backward keeps x and W0, not its output).
            hidden = F.linear(x_drop, lora_A[0])
            result.addmm_(hidden.reshape(-1, self.r).to(result.dtype), lora_B[0].t().to(result.dtype),
                          alpha=self.scaling)
            return result.view(*x.shape[:-1], self.out_features)
        route_in = x_drop if self.router_input == "dropout" else x
        # The experts join the routing GEMM when they read its input in its dtype (float32, no autocast).
        experts_fused = ((not dropout_applies or self.router_input == "dropout") and dtype == torch.float32
                         and not torch.is_autocast_enabled(x.device.type))
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores, lam, hidden = self._gate(route_in, experts_fused)
            weights = self.router.route(scores, lam)
        ctx = self.routing_context
        if ctx.recording:
            self.last_routing = (scores, weights, lam)
        if ctx.standalone and self.lambda_mlp is not None:
            self.lambda_mlp.clear_cache()
        if hidden is None:
            hidden = F.linear(x_drop, lora_A.reshape(self.num_experts * self.r, self.in_features))
        tokens = result.shape[0]
        add_routed_update_(result, hidden.reshape(tokens, self.num_experts, self.r),
                           weights.reshape(tokens, self.num_experts), lora_B, self.scaling)  # in place, one GEMM
        return result.view(*x.shape[:-1], self.out_features)
