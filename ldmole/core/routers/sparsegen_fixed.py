"""Fixed-λ Sparsegen: one constant λ for every token (the reviewers' ablation, docs/method.md §2)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import MoLEConfig
from .base import Router
from .registry import register_router
from .sparsegen import SparsegenRouter

__all__ = ["SparsegenFixedRouter", "released_lambda", "fixed_lambda_of"]


def released_lambda(config: MoLEConfig) -> float:
    """logsigmoid(``lambda_bias_init``) + 1 - ``lambda_eps``: the λ of the reference release before its
    2026-02-25 fix, which left the λ-MLP out of the optimiser (docs/faithfulness.md). With the release's
    initialisation no hidden unit fires, so the untrained λ-MLP outputs its output bias for every token:
    -1.5888 at the defaults (-2.5, 0.01)."""
    b = float(config.lambda_bias_init)
    logsigmoid = min(b, 0.0) - math.log1p(math.exp(-abs(b)))  # the numerically stable form
    return logsigmoid + 1.0 - float(config.lambda_eps)


def fixed_lambda_of(config: MoLEConfig) -> float:
    """The λ a ``sparsegen_fixed`` router uses: ``config.fixed_lambda``, or :func:`released_lambda` when None."""
    return released_lambda(config) if config.fixed_lambda is None else float(config.fixed_lambda)


@register_router
class SparsegenFixedRouter(Router):
    """p = Sparsegen(u; λ) with one λ < 1 for every token: ``MoLEConfig.fixed_lambda``, or when that is None
    the reference release's untrained constant logsigmoid(lambda_bias_init) + 1 - lambda_eps
    (:func:`released_lambda`)."""

    name = "sparsegen_fixed"

    def __init__(self, in_features: int, num_experts: int, config: MoLEConfig,
                 lambda_mlp: Optional[nn.Module] = None, device: Optional[torch.device] = None) -> None:
        super().__init__(in_features, num_experts, config, lambda_mlp, device)
        self.fixed_lambda = fixed_lambda_of(config)

    @classmethod
    def validate(cls, config: MoLEConfig, counts: Sequence[int]) -> None:
        if config.fixed_lambda is not None and not float(config.fixed_lambda) < 1.0:
            raise ValueError(
                f"MoLEConfig.fixed_lambda={config.fixed_lambda!r}: router='sparsegen_fixed' needs fixed_lambda < 1, "
                "or null for the reference release's constant logsigmoid(lambda_bias_init) + 1 - lambda_eps"
            )

    route_scores = classmethod(SparsegenRouter.route_scores.__func__)  # the same projection; only λ differs

    def lam(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.full(scores.shape[:-1], self.fixed_lambda, dtype=scores.dtype, device=scores.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed_lambda={self.fixed_lambda}"
