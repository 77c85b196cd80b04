"""Sparsegen projection (closed form, closed-form backward) and its λ interval bounds.

Sparsegen(u; λ) = argmin_p ||p - u||² - λ||p||² over the simplex = sparsemax(u / (1 - λ)), λ < 1.
With u sorted descending and U_k the sum of the k largest scores:

    k* = max{k : 1 - λ + k u_(k) > U_k},   p_i = max(0, (u_i - U_k*/k*) / (1 - λ) + 1/k*).

(The last form equals (u_i - τ)/(1 - λ) with τ = (U_k* - 1 + λ)/k*, and stays accurate as λ → -∞.)
"""

from __future__ import annotations

import torch

__all__ = ["sparsegen", "lambda_bounds", "lambda_lower_bound", "SparsegenFunction"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lam_like_scores(lam: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Brings λ of shape [...] or [..., 1] to [..., 1] broadcastable against scores [..., E]."""
    if lam.dim() == scores.dim() and lam.shape[-1] == 1:
        return lam
    return lam.unsqueeze(-1)


def _support_thresholds(u_sorted: torch.Tensor, cumsum: torch.Tensor) -> torch.Tensor:
    """1 - (U_k - k u_(k)) for k = 1..E: expert k is active iff λ is below entry k (docs/method.md §2-3)."""
    ks = torch.arange(1, u_sorted.shape[-1] + 1, device=u_sorted.device, dtype=u_sorted.dtype)
    return 1.0 - (cumsum - ks * u_sorted)  # not addcmul: its fused multiply-add rounds once, not twice


def _project(scores: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, 1 - λ) in the compute dtype: the forward of :class:`SparsegenFunction`, also run on its own where no
    gradient is needed (no autograd Function, no saved tensors: inference pays per module call for each op).

    Few ops (this runs once per adapted module and batch, on [tokens, E]): addcdiv with value ±1 and
    reciprocal give the same bits as the divisions and additions they replace."""
    dtype = _compute_dtype(scores.dtype)
    u = scores.to(dtype)
    lam_col = _lam_like_scores(lam, scores).to(dtype)
    one_minus_lam = 1.0 - lam_col

    u_sorted, _ = torch.sort(u, dim=-1, descending=True)
    cumsum = u_sorted.cumsum(dim=-1)
    # λ < _support_thresholds[k-1] <=> expert k is in the support; true for a prefix of k (k = 1
    # always), so the count is k*. lambda_bounds uses the same expression, bit for bit.
    in_support = lam_col < _support_thresholds(u_sorted, cumsum)
    # clamp: NaN scores or λ fail every comparison; they must give NaN weights, not a bad index.
    k_star = in_support.sum(dim=-1, keepdim=True).clamp_min_(1)
    last = k_star - 1
    k_float = k_star.to(dtype)
    top_sum = cumsum.gather(-1, last)
    kth_score = u_sorted.gather(-1, last)
    # (u - U_k*/k*) / (1 - λ) + 1/k*, clamped at 0
    probs = torch.addcdiv(k_float.reciprocal(), torch.addcdiv(u, top_sum, k_float, value=-1.0), one_minus_lam)
    probs = probs.clamp_min_(0.0).mul_(u >= kth_score)  # a product (not where) so NaN propagates
    return probs, one_minus_lam


class SparsegenFunction(torch.autograd.Function):
    """p = Sparsegen(u; λ) over the last dimension; backward in closed form (no autograd through sort).

    On the support S (k = |S|): dp_i/du_j = (δ_ij - 1/k)/(1 - λ), dp_i/dλ = (p_i - 1/k)/(1 - λ).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        probs, one_minus_lam = _project(scores, lam)
        ctx.save_for_backward(probs, one_minus_lam)
        ctx.lam_shape = lam.shape
        ctx.lam_dtype = lam.dtype
        return probs.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor):  # type: ignore[override]
        probs, one_minus_lam = ctx.saved_tensors
        g = grad_probs.to(probs.dtype)
        support = (probs > 0).to(probs.dtype)
        k = support.sum(dim=-1, keepdim=True)
        g_mean = (g * support).sum(dim=-1, keepdim=True) / k
        v = (g - g_mean).mul_(support)
        grad_scores = grad_lam = None
        if ctx.needs_input_grad[0]:
            grad_scores = (v / one_minus_lam).to(grad_probs.dtype)
        if ctx.needs_input_grad[1]:
            # Σ_S g_i (p_i - 1/k) = Σ_S v_i p_i because Σ p = 1.
            grad_lam = ((v * probs).sum(dim=-1, keepdim=True) / one_minus_lam)
            grad_lam = grad_lam.reshape(ctx.lam_shape).to(ctx.lam_dtype)
        return grad_scores, grad_lam


def sparsegen(scores: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Routing weights Sparsegen(scores; lam) over the last dimension.

    Args:
        scores: ``[..., E]`` gating scores (any leading shape, e.g. ``[B, T, E]`` or ``[B, 1, E]``).
        lam: ``[...]`` or ``[..., 1]`` (or a Python float), every value strictly below 1.
            Not checked here (that would need a host sync); the λ-MLP guarantees λ < 1 - eps.

    Returns:
        ``[..., E]`` non-negative weights summing to 1, in the dtype of ``scores``; computed in
        float32 for half/bfloat16 inputs, float64 for float64 inputs. At least one entry is non-zero.
    """
    if not torch.is_tensor(lam):
        lam = torch.full(scores.shape[:-1], float(lam), dtype=scores.dtype, device=scores.device)
    if torch.is_grad_enabled() and (scores.requires_grad or lam.requires_grad):
        return SparsegenFunction.apply(scores, lam)
    return _project(scores, lam)[0].to(scores.dtype)  # the same forward, without autograd's bookkeeping


def lambda_bounds(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The λ interval in which Sparsegen(scores; λ) has exactly ``k`` active experts.

    lower = 1 - (U_k - k u_(k+1)), upper = 1 - (U_k - k u_(k)) with u sorted descending.
    λ in [lower, upper) gives exactly k active experts; λ >= lower gives at most k; λ < upper at
    least k. For k = E, lower is -inf. The interval is empty when u_(k) = u_(k+1) (a tie).

    Args:
        scores: ``[..., E]`` gating scores.
        k: target number of experts, 1 <= k <= E.

    Returns:
        ``(lower, upper)``, each of shape ``[...]``, in the compute dtype (float32 or float64).
    """
    num_experts = scores.shape[-1]
    if not 1 <= int(k) <= num_experts:
        raise ValueError(f"lambda_bounds: k={k} must be in [1, {num_experts}] (the number of experts)")
    thresholds = _thresholds(scores)
    upper = thresholds[..., k - 1]
    if k == num_experts:
        lower = torch.full_like(upper, float("-inf"))
    else:
        lower = thresholds[..., k]  # = 1 - (U_k - k u_(k+1)), the same value as upper(k + 1)
    return lower, upper


def _thresholds(scores: torch.Tensor) -> torch.Tensor:
    """:func:`_support_thresholds` of ``scores [..., E]`` in the compute dtype."""
    u = scores.to(_compute_dtype(scores.dtype))
    u_sorted, _ = torch.sort(u, dim=-1, descending=True)
    return _support_thresholds(u_sorted, u_sorted.cumsum(dim=-1))


def lambda_lower_bound(scores: torch.Tensor, k: int) -> torch.Tensor:
    """λ_lower(k) = 1 - (U_k - k u_(k+1)) ``[...]``: λ at or above it leaves at most ``k`` experts active.

    The lower half of :func:`lambda_bounds`, bit for bit, without its check: the caller ensures
    1 <= k < E (the sparsity loss checks k once per call and skips layers with E <= k).
    """
    return _thresholds(scores)[..., k]
