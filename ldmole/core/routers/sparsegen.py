"""LD-MoLE's router: Sparsegen(u; λ) with a per-token λ from the shared λ-MLP (docs/method.md §2)."""

from __future__ import annotations

from typing import Optional

import torch

from ..sparsegen import sparsegen
from .base import Router
from .registry import register_router

__all__ = ["SparsegenRouter"]


@register_router
class SparsegenRouter(Router):
    """p = Sparsegen(u; λ(x)), λ from the λ-MLP the model shares across layers (``Router.lam``); the
    analytic sparsity loss trains that λ."""

    name = "sparsegen"
    learned_lambda = True
    aux_losses = frozenset({"lb", "sparsity", "z"})

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lam is None:
            raise ValueError(f"router={cls.name!r} needs lam")
        return sparsegen(scores, lam)
