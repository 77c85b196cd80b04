"""ldmole: LD-MoLE (learnable dynamic routing for mixture of LoRA experts) and its baselines.

The names here are the library (`ldmole.core`, torch only); the experiment code lives in
`ldmole.experiment`, reporting in `ldmole.report`, the commands in `ldmole.cli`. Each name is imported
from its module when first used, so importing one module (``ldmole.core.config``) loads only what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("load_mole", "save_mole"), ".core.adapter_io"),
    "compile_mole_model": ".core.compile",
    "MoLEConfig": ".core.config",
    **dict.fromkeys(("get_mole_model", "mole_config_of", "mole_layers", "mole_parameters"), ".core.injection"),
    "LambdaMLP": ".core.lambda_mlp",
    "MoLELinear": ".core.layer",
    **dict.fromkeys(("ReMoLEL1Controller", "active_expert_fraction", "balanced_l1_penalty", "l1_penalty",
                     "load_balance_loss", "router_z_loss", "sparsity_loss"), ".core.losses"),
    **dict.fromkeys(("RoutingContext", "RoutingRecord", "routing_context_of", "routing_records"), ".core.records"),
    **dict.fromkeys(("Router", "get_router", "register_router", "router_names", "topk_weights",
                     "validate_mole_config"), ".core.routers"),
    **dict.fromkeys(("lambda_bounds", "sparsegen"), ".core.sparsegen"),
    **dict.fromkeys(("from_pretrained", "push_to_hub"), ".experiment.pretrained"),
}

__all__ = [
    "MoLEConfig", "MoLELinear", "LambdaMLP", "get_mole_model", "mole_layers", "mole_parameters",
    "mole_config_of", "save_mole", "load_mole", "sparsegen", "lambda_bounds", "topk_weights",
    "RoutingRecord", "RoutingContext", "routing_records", "routing_context_of", "load_balance_loss",
    "sparsity_loss", "router_z_loss", "l1_penalty", "balanced_l1_penalty", "active_expert_fraction",
    "ReMoLEL1Controller", "Router", "register_router", "get_router", "router_names", "validate_mole_config",
    "compile_mole_model",
]

if TYPE_CHECKING:
    from .core.adapter_io import load_mole, save_mole
    from .core.compile import compile_mole_model
    from .core.config import MoLEConfig
    from .core.injection import get_mole_model, mole_config_of, mole_layers, mole_parameters
    from .core.lambda_mlp import LambdaMLP
    from .core.layer import MoLELinear
    from .core.losses import (ReMoLEL1Controller, active_expert_fraction, balanced_l1_penalty, l1_penalty,
                              load_balance_loss, router_z_loss, sparsity_loss)
    from .core.records import RoutingContext, RoutingRecord, routing_context_of, routing_records
    from .core.routers import Router, get_router, register_router, router_names, topk_weights, validate_mole_config
    from .core.sparsegen import lambda_bounds, sparsegen
    from .experiment.pretrained import from_pretrained, push_to_hub


def __getattr__(name: str) -> Any:
    """Imports an exported name's module on first use (``ldmole.from_pretrained`` / ``ldmole.push_to_hub``
    load the experiment layer only then); the subpackages (``ldmole.core`` ...) load the same way."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    if name in ("core", "experiment", "report", "cli"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ldmole' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
