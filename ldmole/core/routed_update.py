"""`add_routed_update_`: the experts' routed update added into the base output in place, keeping only its inputs."""

from __future__ import annotations

import torch

__all__ = ["add_routed_update_"]


def _b_cat(lora_B: torch.Tensor) -> torch.Tensor:
    """``[E, d_out, r] -> [d_out, E·r]``: the experts' B side by side (a copy: E and r are not adjacent in memory)."""
    return lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], -1)


class RoutedUpdateFunction(torch.autograd.Function):
    """result += scaling · Σ_e p_e B_e h_e, in place: one GEMM over the routing-scaled hidden units
    ``(h ⊙ p) [tokens, E·r]`` and the experts' ``B_cat [d_out, E·r]``.

    Autograd through ``(h * p) @ B_cat^T`` would keep both the scaled hidden units and the copy ``B_cat`` from
    the forward to the backward, beside ``h`` and ``p`` (which the product's own backward keeps): per adapted
    projection ``[tokens, E·r]`` and ``[d_out, E·r]`` floats more than a LoRA's. Here the forward saves ``h``,
    ``p`` and ``B`` (the parameter, or its copy in the compute dtype) and the backward rebuilds both. With
    g = grad of the output and G = scaling · g B_cat ``[tokens, E, r]``: grad h = G ⊙ p, grad p = Σ_r G ⊙ h,
    grad B_cat = scaling · g^T (h ⊙ p); ``result``'s gradient is g.

    Shapes: ``result [tokens, d_out]`` (modified and returned), ``hidden [tokens, E, r]``, ``weights [tokens, E]``
    (float32 routing weights), ``lora_B [E, d_out, r]`` (the GEMM runs in ``result``'s dtype, as ``addmm_``).
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, lora_B: torch.Tensor,
                scaling: float) -> torch.Tensor:  # type: ignore[override]
        ctx.mark_dirty(result)
        ctx.save_for_backward(hidden, weights, lora_B)
        ctx.scaling = scaling
        scaled = (hidden * weights.unsqueeze(-1).to(hidden.dtype)).flatten(-2)
        result.addmm_(scaled.to(result.dtype), _b_cat(lora_B).t().to(result.dtype), alpha=scaling)
        return result

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        hidden, weights, lora_B = ctx.saved_tensors
        scaling = ctx.scaling
        p = weights.unsqueeze(-1).to(hidden.dtype)
        b_cat = _b_cat(lora_B).to(grad_out.dtype)
        grad_hidden = grad_weights = grad_B = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_scaled = grad_out.mm(b_cat).mul_(scaling).to(hidden.dtype).view_as(hidden)
            if ctx.needs_input_grad[1]:
                grad_hidden = grad_scaled * p
            if ctx.needs_input_grad[2]:
                grad_weights = (grad_scaled * hidden).sum(-1).to(weights.dtype)
        if ctx.needs_input_grad[3]:
            scaled = (hidden * p).flatten(-2).to(grad_out.dtype)
            grad_b_cat = grad_out.t().mm(scaled).mul_(scaling)  # [d_out, E·r]
            grad_B = grad_b_cat.view(lora_B.shape[1], lora_B.shape[0], lora_B.shape[2]).permute(1, 0, 2)
            grad_B = grad_B.to(lora_B.dtype)
        return grad_out, grad_hidden, grad_weights, grad_B, None


def _add_update_(result: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """The update without autograd: for at most r tokens (decoding) Σ_e B_e (p_e h_e) as one batched GEMM over
    the experts and a sum, whose [E, tokens, d_out] temporary is no larger than the [d_out, E·r] copy of B that
    B_cat needs; else one GEMM over B_cat."""
    scaled = hidden * weights.unsqueeze(-1).to(hidden.dtype)
    tokens, _, r = hidden.shape
    if tokens <= r:
        update = torch.bmm(scaled.transpose(0, 1), lora_B.transpose(1, 2).to(scaled.dtype)).sum(0)
        return result.add_(update.to(result.dtype), alpha=scaling)
    return result.addmm_(scaled.flatten(-2).to(result.dtype), _b_cat(lora_B).t().to(result.dtype), alpha=scaling)


def add_routed_update_(result: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """``result += scaling · Σ_e weights_e · lora_B[e] hidden[:, e]`` in place; returns ``result``. Where autograd
    records (grad mode on and an input that requires grad) this is :class:`RoutedUpdateFunction`; otherwise the
    same arithmetic without its bookkeeping (and, for at most r tokens, a batched GEMM instead of copying B)."""
    if torch.is_grad_enabled() and (result.requires_grad or hidden.requires_grad or weights.requires_grad
                                    or lora_B.requires_grad):
        RoutedUpdateFunction.apply(result, hidden, weights, lora_B, scaling)
        return result
    return _add_update_(result, hidden, weights, lora_B, scaling)
