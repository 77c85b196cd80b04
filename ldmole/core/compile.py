"""Compiling a MoLE model with ``torch.compile``: one compiled region per decoder layer."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .layer import MoLELinear

__all__ = ["compile_mole_model", "COMPILE_OPTIONS"]

# Inductor options: random ops (the experts' dropout) run as eager's kernels on eager's generator, so a
# compiled run draws the same dropout masks as an eager one and gives its numbers to float round-off.
COMPILE_OPTIONS: dict[str, Any] = {"fallback_random": True}


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost elements of ``nn.ModuleList`` s that hold MoLE layers (the decoder layers of a
    transformers model), then every MoLE layer outside them."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or id(module) in inside:
            continue
        for child in module:
            if any(isinstance(m, MoLELinear) for m in child.modules()):
                blocks.append(child)
                inside.update(id(m) for m in child.modules())
    blocks.extend(m for m in model.modules() if isinstance(m, MoLELinear) and id(m) not in inside)
    return blocks


def compile_mole_model(model: nn.Module, options: Optional[dict[str, Any]] = None) -> list[nn.Module]:
    """Compiles, in place (``nn.Module.compile``), every decoder layer of ``model`` that holds MoLE layers
    (every element of an ``nn.ModuleList`` holding one; a MoLE layer outside such a list on its own), and
    returns them. The decoder layers of a model share one compiled graph (their parameters are graph
    inputs); the model's own forward, with the hooks that begin and end its routing context, stays eager.
    ``options``: inductor options, by default :data:`COMPILE_OPTIONS`.

    Raises:
        ValueError: ``model`` has no MoLE layer.
    """
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"compile_mole_model: {type(model).__name__} has no MoLE layer; apply get_mole_model first")
    for block in blocks:
        block.compile(options=dict(COMPILE_OPTIONS if options is None else options))
    return blocks
