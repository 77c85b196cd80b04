"""`fused_linear`: several matrices that read one input as one GEMM, without keeping their concatenation."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["fused_linear"]


class FusedLinearFunction(torch.autograd.Function):
    """x [W_1; W_2; ...]^T + b as one GEMM over the rows of every weight.

    ``F.linear(x, torch.cat(weights), b)`` computes the same, but its backward keeps the concatenated matrix
    (a copy of every weight) alive from the forward to the backward, one per call: with the λ-MLP's first layer
    among the weights that is H x d_in floats per adapted projection. Here the forward saves ``x`` and the
    weights themselves (parameters, or views of them: nothing new), and the backward concatenates again for
    the input gradient. Gradients: x: grad_out [W_1; ...]; W_i: its rows of grad_out^T x; b: grad_out summed
    over the tokens (the GEMMs ``F.linear``'s backward runs).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], *weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(torch.cat(weights))
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_bias = grad_2d.sum(0)
        grad_weights: list[Optional[torch.Tensor]] = [None] * len(weights)
        if any(ctx.needs_input_grad[2:]):
            grad_cat = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
            grad_weights = list(grad_cat.split([w.shape[0] for w in weights]))
            grad_weights = [g if needed else None for g, needed in zip(grad_weights, ctx.needs_input_grad[2:])]
        return (grad_x, grad_bias, *grad_weights)


def fused_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., d_in] -> [..., Σ rows]``: ``F.linear(x, torch.cat(weights), bias)`` with the memory of separate
    weights (:class:`FusedLinearFunction`). All tensors share one dtype and device; ``bias`` covers every row."""
    return FusedLinearFunction.apply(x, bias, *weights)
