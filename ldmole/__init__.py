"""ldmole: LD-MoLE (learnable dynamic routing for mixture of LoRA experts) and its baselines."""

from .adapter_io import load_mole, save_mole
from .config import MoLEConfig
from .injection import get_mole_model, mole_config_of, mole_layers, mole_parameters
from .lambda_mlp import LambdaMLP
from .layer import MoLELinear
from .losses import (
    ReMoLEL1Controller,
    active_expert_fraction,
    balanced_l1_penalty,
    l1_penalty,
    load_balance_loss,
    router_z_loss,
    sparsity_loss,
)
from .records import RoutingRecord, routing_records
from .routing import route, topk_weights
from .sparsegen import lambda_bounds, sparsegen

__all__ = [
    "MoLEConfig", "MoLELinear", "LambdaMLP", "get_mole_model", "mole_layers", "mole_parameters",
    "mole_config_of", "save_mole", "load_mole", "sparsegen", "lambda_bounds", "route", "topk_weights",
    "RoutingRecord", "routing_records", "load_balance_loss", "sparsity_loss", "router_z_loss",
    "l1_penalty", "balanced_l1_penalty", "active_expert_fraction", "ReMoLEL1Controller",
]
