"""ldmole: LD-MoLE (learnable dynamic routing for mixture of LoRA experts) and its baselines.

The names here are the library (`ldmole.core`, torch only); the experiment code lives in
`ldmole.experiment`, reporting in `ldmole.report`, the commands in `ldmole.cli`.
"""

__version__ = "0.2.0"

from .core.adapter_io import load_mole, save_mole
from .core.config import MoLEConfig
from .core.injection import get_mole_model, mole_config_of, mole_layers, mole_parameters
from .core.lambda_mlp import LambdaMLP
from .core.layer import MoLELinear
from .core.losses import (
    ReMoLEL1Controller,
    active_expert_fraction,
    balanced_l1_penalty,
    l1_penalty,
    load_balance_loss,
    router_z_loss,
    sparsity_loss,
)
from .core.records import RoutingRecord, routing_records
from .core.routers import Router, get_router, register_router, router_names
from .core.routing import route, topk_weights
from .core.sparsegen import lambda_bounds, sparsegen

__all__ = [
    "MoLEConfig", "MoLELinear", "LambdaMLP", "get_mole_model", "mole_layers", "mole_parameters",
    "mole_config_of", "save_mole", "load_mole", "sparsegen", "lambda_bounds", "route", "topk_weights",
    "RoutingRecord", "routing_records", "load_balance_loss", "sparsity_loss", "router_z_loss",
    "l1_penalty", "balanced_l1_penalty", "active_expert_fraction", "ReMoLEL1Controller",
    "Router", "register_router", "get_router", "router_names",
]


def __getattr__(name: str):
    """``ldmole.from_pretrained`` / ``ldmole.push_to_hub`` load the experiment layer only when used."""
    if name in ("from_pretrained", "push_to_hub"):
        from .experiment import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'ldmole' has no attribute {name!r}")
