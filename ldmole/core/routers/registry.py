"""The router registry: ``MoLEConfig.router`` names -> `Router` classes, and the one check of a config
against its router (:func:`validate_mole_config`)."""

from __future__ import annotations

from ..config import MoLEConfig
from ..suggest import did_you_mean
from .base import AUX_LOSSES, Router

__all__ = ["register_router", "get_router", "router_names", "aux_losses_of", "validate_mole_config", "LORA"]

# router="lora" is plain LoRA: one expert and no router, so it has no Router class.
LORA = "lora"

_REGISTRY: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: makes ``cls`` available as ``MoLEConfig(router=cls.name)``.

    Raises:
        ValueError: ``cls`` is not a Router, has no name, names an unknown auxiliary loss, redefines ``lam``
            while ``learned_lambda`` (MoLELinear computes that λ from the λ-MLP itself), or its name is
            taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise ValueError(f"register_router takes a subclass of ldmole.core.routers.Router, got {cls!r}")
    if not cls.name or cls.name == LORA:
        raise ValueError(f"{cls.__name__}.name={cls.name!r}: give the router a name other than '' and {LORA!r}")
    unknown = set(cls.aux_losses) - AUX_LOSSES
    if unknown:
        raise ValueError(f"{cls.__name__}.aux_losses has unknown losses {sorted(unknown)}; choose from {sorted(AUX_LOSSES)}")
    if cls.learned_lambda and cls.lam is not Router.lam:
        raise ValueError(f"{cls.__name__} has learned_lambda=True and redefines lam(); a learned λ is the shared "
                         "λ-MLP's output, which MoLELinear computes itself: drop the lam() method, or set "
                         "learned_lambda=False and compute λ in lam()")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"router name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def router_names() -> tuple[str, ...]:
    """Every valid ``MoLEConfig.router``: the registered routers in registration order, then 'lora'."""
    return (*_REGISTRY, LORA)


def get_router(name: str) -> type[Router]:
    """The Router class registered as ``name``.

    Raises:
        ValueError: ``name`` is 'lora' (no router) or unknown (suggesting the closest name).
    """
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    if name == LORA:
        raise ValueError(f"MoLEConfig.router={LORA!r} is plain LoRA: one expert and no router class")
    names = router_names()
    raise ValueError(f"MoLEConfig.router={name!r} is unknown{did_you_mean(name, names)}; choose one of {names}")


def aux_losses_of(name: str) -> frozenset:
    """The auxiliary losses that apply to router ``name`` (none for 'lora')."""
    return frozenset() if name == LORA else get_router(name).aux_losses


def validate_mole_config(config: MoLEConfig) -> None:
    """Checks ``config`` against its router, once per model (``get_mole_model`` calls it; so does an
    ``MoLELinear`` built on its own): the router name is registered, ``router_options`` holds only what the
    router declares, and the router's :meth:`Router.validate` accepts the config for its expert counts
    (``top_k`` fits, ``fixed_lambda`` set, ...); ``router="lora"`` needs ``num_experts=1``. The fields'
    own checks ran when the config was made.

    Raises:
        TypeError: ``config`` is not a ``MoLEConfig``.
        ValueError: naming the ``MoLEConfig`` field and the fix.
    """
    if not isinstance(config, MoLEConfig):
        raise TypeError(f"validate_mole_config takes a MoLEConfig, got {type(config).__name__}")
    counts = config.expert_counts()
    if config.router == LORA:
        if counts != [1]:
            raise ValueError(f"MoLEConfig.num_experts={config.num_experts!r}: router={LORA!r} is a single LoRA; "
                             "set num_experts=1")
        if config.router_options:
            raise ValueError(f"MoLEConfig.router_options={config.router_options!r}: router={LORA!r} takes none")
        return
    router = get_router(config.router)
    router.check_options(config.router_options)
    router.validate(config, counts)
