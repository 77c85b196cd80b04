"""Routing functions by name: gating scores u [..., E] -> non-negative expert weights p [..., E]."""

from __future__ import annotations

from typing import Optional

import torch

from .routers import get_router, topk_weights

__all__ = ["route", "topk_weights"]


def route(scores: torch.Tensor, router: str, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routing weights of the registered ``router`` for ``scores [..., E]`` (``lam [...]`` for the Sparsegen routers).

    sparsegen / sparsegen_fixed: Sparsegen(u; λ); topk: renormalised top-k of softmax;
    relu: ReLU(u) (a token may get no expert); softmax: dense softmax.
    """
    return get_router(router).route_scores(scores, top_k=top_k, lam=lam)
