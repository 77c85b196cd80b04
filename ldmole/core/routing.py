"""Routing functions: gating scores u [..., E] -> non-negative expert weights p [..., E]."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .sparsegen import sparsegen

__all__ = ["route", "topk_weights", "SPARSE_ROUTERS", "DENSE_ROUTERS"]

SPARSE_ROUTERS = ("sparsegen", "sparsegen_fixed", "topk", "relu")
DENSE_ROUTERS = ("softmax",)


def topk_weights(scores: torch.Tensor, k: int) -> torch.Tensor:
    """MoLA routing: softmax over all experts, keep the k largest, renormalise them to sum 1."""
    probs = torch.softmax(scores, dim=-1)
    top_values, top_index = probs.topk(k, dim=-1)
    top_values = top_values / top_values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_index, top_values)


def route(scores: torch.Tensor, router: str, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routing weights of ``router`` for ``scores [..., E]`` (``lam [...]`` for the Sparsegen routers).

    sparsegen / sparsegen_fixed: Sparsegen(u; λ); topk: renormalised top-k of softmax;
    relu: ReLU(u) (a token may get no expert); softmax: dense softmax.
    """
    if router in ("sparsegen", "sparsegen_fixed"):
        if lam is None:
            raise ValueError(f"router={router!r} needs lam")
        return sparsegen(scores, lam)
    if router == "topk":
        return topk_weights(scores, top_k)
    if router == "relu":
        return F.relu(scores)
    if router == "softmax":
        return torch.softmax(scores, dim=-1)
    raise ValueError(f"router={router!r} has no routing function; choose sparsegen, sparsegen_fixed, topk, relu or softmax")
