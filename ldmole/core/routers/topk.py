"""MoLA's router: the top-k of softmax(u), renormalised (docs/method.md §2)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import MoLEConfig
from .base import Router, check_top_k_fits
from .registry import register_router

__all__ = ["TopKRouter", "topk_weights"]


def topk_weights(scores: torch.Tensor, k: int) -> torch.Tensor:
    """MoLA routing: softmax over all experts, keep the k largest, renormalise them to sum 1."""
    probs = torch.softmax(scores, dim=-1)
    top_values, top_index = probs.topk(k, dim=-1)
    top_values = top_values / top_values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_index, top_values)


@register_router
class TopKRouter(Router):
    """Exactly ``MoLEConfig.top_k`` experts per token, weighted by their renormalised softmax."""

    name = "topk"
    selects_from_softmax = True

    @classmethod
    def validate(cls, config: MoLEConfig, counts: Sequence[int]) -> None:
        check_top_k_fits(config, counts)

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        return topk_weights(scores, top_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}"
