"""Routers, one class per routing function, found by name (``MoLEConfig.router``) in a registry.

Importing this package registers the built-in routers; code outside it adds one by subclassing
:class:`Router` and decorating the class with :func:`register_router`.
"""

from .base import AUX_LOSSES, Router
from .registry import LORA, aux_losses_of, get_router, register_router, router_names, validate_mole_config

# Imported in the order error messages and benchmarks list them (registration order).
from .sparsegen import SparsegenRouter
from .sparsegen_fixed import SparsegenFixedRouter
from .topk import TopKRouter, topk_weights
from .relu import ReLURouter
from .softmax import SoftmaxRouter

# The routers this package ships, in the order tables and benchmarks list them.
BUILTIN_ROUTERS: tuple[str, ...] = tuple(
    cls.name for cls in (SparsegenRouter, SparsegenFixedRouter, TopKRouter, ReLURouter, SoftmaxRouter)
)

__all__ = [
    "Router", "AUX_LOSSES", "LORA", "BUILTIN_ROUTERS", "register_router", "get_router", "router_names",
    "aux_losses_of", "validate_mole_config", "topk_weights", "SparsegenRouter", "SparsegenFixedRouter",
    "TopKRouter", "ReLURouter", "SoftmaxRouter",
]
