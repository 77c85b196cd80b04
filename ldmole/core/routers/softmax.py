"""Dense MoLE's router: p = softmax(u) over all experts."""

from __future__ import annotations

from typing import Optional

import torch

from .base import Router
from .registry import register_router

__all__ = ["SoftmaxRouter"]


@register_router
class SoftmaxRouter(Router):
    """Every expert gets a non-zero weight (load balance in the Switch form, docs/method.md §3)."""

    name = "softmax"
    dense = True

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.softmax(scores, dim=-1)
