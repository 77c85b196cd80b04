"""ReMoLE's router (after ReMoE): p = ReLU(u), steered toward top_k active experts by an adaptive L1."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import MoLEConfig
from .base import Router, check_top_k_fits
from .registry import register_router

__all__ = ["ReLURouter"]


@register_router
class ReLURouter(Router):
    """p = ReLU(u): a token may get no expert. ``MoLEConfig.top_k`` is the L1 controller's target
    number of active experts (target sparsity 1 - top_k/E, docs/method.md §2)."""

    name = "relu"
    routes_every_token = False
    aux_losses = frozenset({"lb", "z", "l1"})

    @classmethod
    def validate(cls, config: MoLEConfig, counts: Sequence[int]) -> None:
        check_top_k_fits(config, counts)

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.relu(scores)
