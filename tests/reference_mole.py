"""Test helper: whether a layer and its reference (the package's dense-einsum formulation,
``ldmole.core.dense_reference``, or PEFT's ``lora.Linear`` for ``router="lora"``) compute the same
adapter outputs and gradients, in evaluation or in training mode (the same dropout mask for both).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ldmole import MoLELinear


class EquivalenceError(AssertionError):
    """A layer and its reference disagree on the same weights (or the comparison would be void)."""


def peft_twin(layer: MoLELinear) -> nn.Module:
    """PEFT's ``lora.Linear`` on a copy of ``layer``'s base with its (one-expert, ``router="lora"``) weights and
    dropout."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=layer.r, lora_alpha=layer.scaling * layer.r, lora_dropout=layer.config.dropout,
                        target_modules=["proj"], bias="none")
    model = get_peft_model(nn.Sequential(OrderedDict(proj=copy.deepcopy(layer.base_layer))), config)
    twin = model.base_model.model.proj
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


def _adapter_output_and_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                              seed: int) -> dict[str, torch.Tensor]:
    """``module(x) - base(x)`` and, after backward of ``sum(out * g)``, the gradients of x and the adapter.

    The forward runs from the random state ``seed`` (the global one is left as it was), so two layers
    that draw one dropout mask of the input's shape draw the same one.
    """
    x = x.detach().clone().requires_grad_(True)
    _clear_grads(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = module(x)
    with torch.no_grad():
        base_out = module.base_layer(x)
    out.backward(g)
    result = {"adapter_output": (out - base_out).detach(), "x.grad": x.grad.detach()}
    result.update({f"{k}.grad": t.detach().clone() for k, t in adapter_grads(module).items()})
    _clear_grads(module)
    return result


def check_equivalence(layer: nn.Module, twin: nn.Module, x: torch.Tensor, tol: float = 1e-4,
                      training: bool = False, seed: int = 0) -> dict[str, float]:
    """Relative errors (max |difference| / max |value|) of adapter output and gradients, in evaluation mode
    or, with ``training``, in training mode with both forwards run from the random state ``seed`` (the
    same dropout mask).

    Raises :class:`EquivalenceError` when one exceeds ``tol``, or when a compared quantity of
    ``layer`` is identically zero (the check would then prove nothing).
    """
    layer.train(training), twin.train(training)
    g = torch.randn(*x.shape[:-1], layer.out_features, generator=torch.Generator().manual_seed(1234))
    ours, theirs = _adapter_output_and_grads(layer, x, g, seed), _adapter_output_and_grads(twin, x, g, seed)
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
