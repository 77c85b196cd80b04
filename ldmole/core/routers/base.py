"""`Router`: the abstract router of a MoLE layer (gating weight W_g, routing function, its facts and checks)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoLEConfig
from ..suggest import did_you_mean

__all__ = ["Router", "AUX_LOSSES", "check_top_k_fits"]

# Auxiliary losses a router may take part in (ldmole.core.losses): load balance, analytic λ
# sparsity, router z-loss, ReMoLE's adaptive L1 (which also turns on the trainer's L1 controller).
AUX_LOSSES = frozenset({"lb", "sparsity", "z", "l1"})


def check_top_k_fits(config: MoLEConfig, counts: Sequence[int]) -> None:
    """Raises when ``config.top_k`` exceeds the smallest expert count (routers that count on k experts)."""
    if counts and config.top_k > min(counts):
        raise ValueError(
            f"MoLEConfig.top_k={config.top_k} exceeds num_experts={config.num_experts!r} (smallest layer has "
            f"{min(counts)} experts); lower top_k or add experts"
        )


def _type_fits(value: Any, default: Any) -> bool:
    """Whether an option value has the type of its default (ints pass for floats; None defaults take anything)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


class Router(nn.Module):
    """Gating scores u = W_g x and routing weights p = route(u) [..., E] of one MoLE layer (docs/method.md §1-2).

    A router owns ``weight`` (W_g, E x d_in, kaiming-uniform(a=√5)), saved as ``<layer>.router.weight``.
    Subclasses set the class facts below and define :meth:`route_scores` (the routing function of the
    scores), and :meth:`lam` when they route with a λ; register them with
    :func:`ldmole.core.routers.register_router` so that ``MoLEConfig(router=name)`` finds them. Every
    setting comes from the ``MoLEConfig`` (``top_k`` here; ``fixed_lambda`` in the fixed-λ router).

    A router's own settings: a router that needs a setting no ``MoLEConfig`` field holds declares it in
    ``default_options`` (name -> default), and the config carries the values in
    ``MoLEConfig.router_options`` (a plain mapping, so ``mole_config.json`` round-trips; a method YAML sets
    ``mole: {router: name, router_options: {temperature: 2.0}}``). ``validate_mole_config`` refuses keys the
    router does not declare and values of another type than the default; :meth:`validate` checks the
    values' ranges. The layer's router gets the merged mapping as ``self.options``, and :meth:`forward`
    passes it to :meth:`route_scores` as keyword arguments, which declares them with the same defaults
    (so a call of the classmethod alone gets them too). Adding such a router touches only its file and a
    method YAML.

    Class attributes:
        name: the ``MoLEConfig.router`` value.
        dense: every expert always gets a non-zero weight (load balance then counts each token's top
            expert, the Switch form).
        learned_lambda: λ per token from the shared λ-MLP, which the model owns (registered once
            under ``ldmole_lambda_mlps``); the router only holds a reference. Its λ is the λ-MLP's output,
            :meth:`lam` as defined here (``register_router`` refuses a learned-λ router that redefines it):
            ``MoLELinear`` computes that λ itself, its first layer in one GEMM with the router's scores.
        routes_every_token: every token gets at least one expert (False for ReLU routing).
        selects_from_softmax: the weights are a renormalised selection of softmax(u), so the load
            balance's ``lb_probs=softmax`` form takes P from the full softmax.
        aux_losses: the auxiliary losses (names in ``AUX_LOSSES``) that apply to this router.
        default_options: the router's own settings and their defaults (see above; empty for the built-ins).

    Args:
        in_features: d_in.
        num_experts: E of this layer.
        config: the model's ``MoLEConfig``, already checked by ``validate_mole_config``.
        lambda_mlp: the shared λ predictor, exactly when ``learned_lambda``.
        device: where ``weight`` is created.
    Shapes: ``x [..., d_in] -> (scores, weights) [..., E], lam [...] or None``, all float32.
    """

    name: ClassVar[str] = ""
    dense: ClassVar[bool] = False
    learned_lambda: ClassVar[bool] = False
    routes_every_token: ClassVar[bool] = True
    selects_from_softmax: ClassVar[bool] = False
    aux_losses: ClassVar[frozenset] = frozenset({"lb", "z"})
    default_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, in_features: int, num_experts: int, config: MoLEConfig,
                 lambda_mlp: Optional[nn.Module] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if self.learned_lambda and lambda_mlp is None:
            raise ValueError(f"router={self.name!r} needs a lambda_mlp (get_mole_model creates the shared one)")
        if not self.learned_lambda and lambda_mlp is not None:
            raise ValueError(f"router={self.name!r} has no learned λ; pass lambda_mlp=None")
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = config.top_k
        self.options = self.resolved_options(config)
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device))
        # Held in a list so the shared module is not registered (and saved) under every layer.
        self._lambda_mlp = [lambda_mlp] if lambda_mlp is not None else []
        self.reset_parameters()

    @classmethod
    def resolved_options(cls, config: MoLEConfig) -> dict[str, Any]:
        """``default_options`` updated with ``config.router_options``."""
        return {**cls.default_options, **config.router_options}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuses keys of ``MoLEConfig.router_options`` that the router does not declare in ``default_options``,
        and values of another type than their default (errors name the key and the fix)."""
        declared = sorted(cls.default_options)
        for key, value in options.items():
            if key not in cls.default_options:
                takes = f"it takes {declared}" if declared else "it takes none"
                raise ValueError(f"MoLEConfig.router_options has {key!r}{did_you_mean(key, declared)}, which "
                                 f"router={cls.name!r} does not take; {takes}")
            default = cls.default_options[key]
            if not _type_fits(value, default):
                raise ValueError(f"MoLEConfig.router_options[{key!r}]={value!r} must be a {type(default).__name__} "
                                 f"like its default {default!r} (router={cls.name!r})")

    @classmethod
    def validate(cls, config: MoLEConfig, counts: Sequence[int]) -> None:
        """Checks ``config`` against the distinct per-layer expert ``counts``; raises ValueError naming the
        ``MoLEConfig`` field and the fix. Called once per model, by ``validate_mole_config``. The base router
        has nothing to check."""

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The routing function: non-negative weights ``[..., E]`` from ``scores [..., E]`` (``lam [...]``,
        ``top_k`` and the router's own options for the routers that use them)."""
        raise NotImplementedError(f"router {cls.__name__} must define route_scores")

    @property
    def lambda_mlp(self) -> Optional[nn.Module]:
        return self._lambda_mlp[0] if self._lambda_mlp else None

    def reset_parameters(self) -> None:
        """W_g kaiming-uniform(a=√5), as ``nn.Linear`` (and drawing the same random numbers)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def lam(self, x: torch.Tensor, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """λ ``[...]`` of every token (float32): the λ-MLP's for ``learned_lambda`` routers, None for routers
        without one; a router with a λ of its own (fixed-λ Sparsegen) redefines it."""
        return self.lambda_mlp(x) if self.learned_lambda else None

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"name={self.name}, in_features={self.in_features}, num_experts={self.num_experts}{options}"

    def route(self, scores: torch.Tensor, lam: Optional[torch.Tensor]) -> torch.Tensor:
        """Routing weights ``[..., E]`` of float32 ``scores`` and ``lam`` (call with autocast off)."""
        return self.route_scores(scores, top_k=self.top_k, lam=lam, **self.options)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The plain computation (``MoLELinear`` runs a fused one): scores, weights, λ of ``x``."""
        # Routing is computed in float32 also under autocast: bf16 scores flip near-ties and λ bounds.
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float())
            lam = self.lam(x, scores)
            return scores, self.route(scores, lam), lam
