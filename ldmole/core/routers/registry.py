"""The router registry: ``MoLEConfig.router`` names -> `Router` classes."""

from __future__ import annotations

from ..suggest import did_you_mean
from .base import AUX_LOSSES, Router

__all__ = ["register_router", "get_router", "router_names", "aux_losses_of", "LORA"]

# router="lora" is plain LoRA: one expert and no router, so it has no Router class.
LORA = "lora"

_REGISTRY: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: makes ``cls`` available as ``MoLEConfig(router=cls.name)``.

    Raises:
        ValueError: ``cls`` is not a Router, has no name, names an unknown auxiliary loss, or its
            name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise ValueError(f"register_router takes a subclass of ldmole.core.routers.Router, got {cls!r}")
    if not cls.name or cls.name == LORA:
        raise ValueError(f"{cls.__name__}.name={cls.name!r}: give the router a name other than '' and {LORA!r}")
    unknown = set(cls.aux_losses) - AUX_LOSSES
    if unknown:
        raise ValueError(f"{cls.__name__}.aux_losses has unknown losses {sorted(unknown)}; choose from {sorted(AUX_LOSSES)}")
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
        raise ValueError(f"router={LORA!r} is plain LoRA: one expert and no router class")
    names = router_names()
    raise ValueError(f"router={name!r} is unknown{did_you_mean(name, names)}; choose one of {names}")


def aux_losses_of(name: str) -> frozenset:
    """The auxiliary losses that apply to router ``name`` (none for 'lora')."""
    return frozenset() if name == LORA else get_router(name).aux_losses
