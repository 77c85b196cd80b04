"""Test helper: the reference release's dense-einsum MoLE layer, and a check that a layer agrees with it.

:class:`DenseEinsumMoLE` is written from the reference release's description, independently of
``MoLELinear``'s fused rank-(E·r) form: every expert's full output ``[B, S, E, d_out]`` is built and
mixed with the routing weights. ``MoLELinear`` must compute the same outputs and gradients.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldmole import LambdaMLP, MoLELinear, route


class EquivalenceError(AssertionError):
    """A layer and its reference disagree on the same weights (or the comparison would be void)."""


class DenseEinsumMoLE(nn.Module):
    """Mixture of LoRA experts computed densely: every expert's full output [B, S, E, d_out] is built.

    out = base(x) + scaling * einsum("bsno,bsn->bso", y, p) with
    y = einsum("bsnr,nro->bsno", einsum("bsni,nir->bsnr", dropout(x) expanded to [B, S, E, d_in], A), B)
    and p = route(W_g x) in float32 from the layer input. Parameters ``lora_A [E, r, d_in]``,
    ``lora_B [E, d_out, r]``, ``router`` (E x d_in); the λ-MLP (sparsegen) is held by reference.
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float,
                 router: str, top_k: int = 2, lambda_mlp: Optional[LambdaMLP] = None,
                 fixed_lambda: Optional[float] = None) -> None:
        super().__init__()
        if router == "lora":
            raise ValueError("DenseEinsumMoLE needs a routed variant")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.r, self.scaling = num_experts, r, alpha / r
        self.router_kind, self.top_k, self.fixed_lambda = router, top_k, fixed_lambda
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, r, device=device))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=device)
        self._lambda_mlp = [lambda_mlp] if lambda_mlp is not None else []
        with torch.no_grad():
            for e in range(num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B[e], a=math.sqrt(5))

    @property
    def lambda_mlp(self) -> Optional[LambdaMLP]:
        return self._lambda_mlp[0] if self._lambda_mlp else None

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [B, S, E] in float32 (also under autocast); clears the λ-MLP's cache."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.router.weight.float())
            lam = None
            if self.router_kind == "sparsegen":
                lam = self.lambda_mlp(x)
                self.lambda_mlp.clear_cache()
            elif self.router_kind == "sparsegen_fixed":
                lam = torch.full(scores.shape[:-1], self.fixed_lambda, dtype=scores.dtype, device=scores.device)
            return route(scores, self.router_kind, top_k=self.top_k, lam=lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x_drop = self.lora_dropout(x)
        x_experts = x_drop.unsqueeze(-2).expand(*x_drop.shape[:-1], self.num_experts, self.in_features)
        hidden = torch.einsum("bsni,nir->bsnr", x_experts, self.lora_A.transpose(1, 2))
        expert_out = torch.einsum("bsnr,nro->bsno", hidden, self.lora_B.transpose(1, 2))  # [B, S, E, d_out]
        weights = self.routing_weights(x)
        update = torch.einsum("bsno,bsn->bso", expert_out, weights.to(expert_out.dtype))
        return result + (update * self.scaling).to(result.dtype)


def dense_twin(layer: MoLELinear) -> DenseEinsumMoLE:
    """A :class:`DenseEinsumMoLE` on the same base with a copy of ``layer``'s weights (and λ-MLP)."""
    mlp = copy.deepcopy(layer.lambda_mlp)
    twin = DenseEinsumMoLE(layer.base_layer, layer.num_experts, layer.r, alpha=layer.scaling * layer.r, dropout=0.0,
                           router=layer.router_kind, top_k=layer.router.top_k, lambda_mlp=mlp,
                           fixed_lambda=getattr(layer.router, "fixed_lambda", None))
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
        twin.lora_B.copy_(layer.lora_B)
        twin.router.weight.copy_(layer.router.weight)
    return twin


def peft_twin(layer: MoLELinear) -> nn.Module:
    """PEFT's ``lora.Linear`` on a copy of ``layer``'s base with its (one-expert, ``router="lora"``) weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=layer.r, lora_alpha=layer.scaling * layer.r, target_modules=["proj"], bias="none")
    twin = get_peft_model(nn.Sequential(OrderedDict(proj=copy.deepcopy(layer.base_layer))), config).base_model.model.proj
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A[0])
        twin.lora_B["default"].weight.copy_(layer.lora_B[0])
    return twin


def adapter_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the adapter parameters in ``MoLELinear``'s layout (PEFT's lora.Linear included)."""
    if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):  # PEFT lora.Linear
        return {"lora_A": module.lora_A["default"].weight.grad.unsqueeze(0),
                "lora_B": module.lora_B["default"].weight.grad.unsqueeze(0)}
    grads = {"lora_A": module.lora_A.grad, "lora_B": module.lora_B.grad}
    if getattr(module, "router", None) is not None:
        grads["router"] = module.router.weight.grad
    if module.lambda_mlp is not None:
        grads["lambda_mlp.fc1"] = module.lambda_mlp.fc1.weight.grad
    return grads


def _clear_grads(module: nn.Module) -> None:
    """Drops the gradients of ``module`` and of its λ-MLP, which it holds unregistered."""
    mlp = getattr(module, "lambda_mlp", None)
    for p in [*module.parameters(), *(mlp.parameters() if mlp is not None else [])]:
        p.grad = None


def _adapter_output_and_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """``module(x) - base(x)`` and, after backward of ``sum(out * g)``, the gradients of x and the adapter."""
    x = x.detach().clone().requires_grad_(True)
    _clear_grads(module)
    out = module(x)
    with torch.no_grad():
        base_out = module.base_layer(x)
    out.backward(g)
    result = {"adapter_output": (out - base_out).detach(), "x.grad": x.grad.detach()}
    result.update({f"{k}.grad": t.detach().clone() for k, t in adapter_grads(module).items()})
    _clear_grads(module)
    return result


def check_equivalence(layer: nn.Module, twin: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> dict[str, float]:
    """Relative errors (max |difference| / max |value|) of adapter output and gradients, in eval mode.

    Raises :class:`EquivalenceError` when one exceeds ``tol``, or when a compared quantity of
    ``layer`` is identically zero (the check would then prove nothing).
    """
    layer.eval(), twin.eval()
    g = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(1234))
    ours, theirs = _adapter_output_and_grads(layer, x, g), _adapter_output_and_grads(twin, x, g)
    void = [k for k, t in ours.items() if t.abs().max().item() == 0]
    if void:
        raise EquivalenceError(f"{', '.join(void)} identically zero: the check would be void")
    errors = {k: (ours[k] - theirs[k]).abs().max().item()
              / max(ours[k].abs().max().item(), theirs[k].abs().max().item(), 1e-30) for k in ours}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    if bad:
        detail = ", ".join(f"{k} rel. err {e:.3g}" for k, e in bad.items())
        raise EquivalenceError(f"the layers disagree on the same weights ({detail}; tolerance {tol:g})")
    return errors
