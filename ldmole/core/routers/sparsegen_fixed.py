"""Fixed-λ Sparsegen: one constant λ for every token (the reviewers' ablation, docs/method.md §2)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import MoLEConfig
from .base import Router
from .registry import register_router
from .sparsegen import SparsegenRouter

__all__ = ["SparsegenFixedRouter"]


@register_router
class SparsegenFixedRouter(Router):
    """p = Sparsegen(u; λ) with λ = ``MoLEConfig.fixed_lambda`` (< 1) for every token."""

    name = "sparsegen_fixed"

    def __init__(self, in_features: int, num_experts: int, config: MoLEConfig,
                 lambda_mlp: Optional[nn.Module] = None, device: Optional[torch.device] = None) -> None:
        super().__init__(in_features, num_experts, config, lambda_mlp, device)
        self.fixed_lambda = float(config.fixed_lambda)

    @classmethod
    def validate(cls, config: MoLEConfig, counts: Sequence[int]) -> None:
        if config.fixed_lambda is None or not float(config.fixed_lambda) < 1.0:
            raise ValueError(
                f"MoLEConfig.fixed_lambda={config.fixed_lambda!r}: router='sparsegen_fixed' needs fixed_lambda < 1 "
                "(e.g. 0.5)"
            )

    route_scores = classmethod(SparsegenRouter.route_scores.__func__)  # the same projection; only λ differs

    def lam(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.full(scores.shape[:-1], self.fixed_lambda, dtype=scores.dtype, device=scores.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed_lambda={self.fixed_lambda}"
