"""Auxiliary routing losses over routing records: load balance, λ sparsity, z-loss, ReMoLE L1.

Every loss is computed per module over real tokens (the record's attention mask, when present)
and averaged over modules. None of them syncs with the host.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .records import RoutingRecord
from .routing import DENSE_ROUTERS
from .sparsegen import lambda_bounds

__all__ = [
    "load_balance_loss", "sparsity_loss", "router_z_loss", "l1_penalty", "ReMoLEL1Controller",
    "active_expert_fraction",
]


def _flat(record: RoutingRecord, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor [..., E]`` flattened to ``[N, E]`` and the float token mask ``[N]`` (ones without a mask)."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    if record.mask is None:
        return flat, torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
    return flat, record.mask.reshape(-1).to(flat.dtype)


def _mean_over(values: Sequence[torch.Tensor], like: Sequence[RoutingRecord]) -> torch.Tensor:
    """Mean of per-module losses (a zero scalar when there are none)."""
    if not values:
        device = like[0].weights.device if like else None
        return torch.zeros((), device=device)
    return torch.stack(values).mean()


def load_balance_loss(records: Sequence[RoutingRecord], dense_top_k: int = 1) -> torch.Tensor:
    """L_lb = E Σ_i f_i P_i per module, averaged over modules (PAPER.md §3).

    P_i is the mean routing weight of expert i over real tokens (carries the gradient); f_i is the
    share of all (token, expert) activations that go to expert i (no gradient). For dense routers
    (softmax) every expert is always active, which makes the loss identically 1: there f_i comes
    from each token's ``dense_top_k`` highest-weight experts instead (the Switch form).
    Records without a router (plain LoRA) are skipped.
    """
    losses = []
    for record in records:
        weights, mask = _flat(record, record.weights)
        num_experts = weights.shape[-1]
        if num_experts < 2:
            continue
        token_count = mask.sum().clamp_min(1.0)
        mean_weight = (weights * mask[:, None]).sum(0) / token_count
        with torch.no_grad():
            if record.router in DENSE_ROUTERS:
                top = weights.topk(min(dense_top_k, num_experts), dim=-1).indices
                active = torch.zeros_like(weights).scatter(-1, top, 1.0)
            else:
                active = (weights > 0).to(weights.dtype)
            active = active * mask[:, None]
            share = active.sum(0) / active.sum().clamp_min(1.0)
        losses.append(num_experts * (share * mean_weight).sum())
    return _mean_over(losses, records)


def sparsity_loss(records: Sequence[RoutingRecord], k: int) -> torch.Tensor:
    """Analytic sparsity control: mean over real tokens of ReLU(λ_lower(k) - λ), averaged over modules.

    λ_lower(k) = 1 - (U_k - k u_(k+1)) from the detached scores, so the loss trains the λ-MLP only
    and is zero once every token has at most k active experts. Layers with E <= k contribute 0.
    Only Sparsegen records with a learned λ take part.
    """
    if k < 1:
        raise ValueError(f"sparsity_k={k} must be >= 1")
    losses = []
    for record in records:
        if record.lam is None or record.router != "sparsegen":
            continue
        num_experts = record.scores.shape[-1]
        if k >= num_experts:
            losses.append(record.lam.sum() * 0.0)
            continue
        lower, _ = lambda_bounds(record.scores.detach(), k)
        hinge = torch.relu(lower - record.lam).reshape(-1)
        _, mask = _flat(record, record.scores)
        losses.append((hinge * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def router_z_loss(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(u)², averaged over routed modules."""
    losses = []
    for record in records:
        if record.scores.shape[-1] < 2:
            continue
        scores, mask = _flat(record, record.scores)
        z = torch.logsumexp(scores, dim=-1).square()
        losses.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def l1_penalty(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """ReMoLE's L1 term: mean over real tokens of Σ_e p_e, averaged over ReLU-routed modules."""
    losses = []
    for record in records:
        if record.router != "relu":
            continue
        weights, mask = _flat(record, record.weights)
        losses.append((weights.sum(-1) * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def active_expert_fraction(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """Mean over modules of the fraction of (real token, expert) pairs with a non-zero weight."""
    fractions = []
    for record in records:
        weights, mask = _flat(record, record.weights.detach())
        active = (weights > 0).to(weights.dtype).mean(-1)
        fractions.append((active * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(fractions, records)


class ReMoLEL1Controller:
    """ReMoE's adaptive L1 coefficient: c ← c · rate^sign(target_sparsity - measured_sparsity).

    target_sparsity = 1 - target_k / E. The coefficient stays a device tensor, so the update needs
    no host sync. ``state_dict`` / ``load_state_dict`` make it resumable.
    """

    def __init__(self, target_k: int, num_experts: int, initial: float = 1e-8, rate: float = 1.2) -> None:
        if not 0 < target_k <= num_experts:
            raise ValueError(f"top_k={target_k} must be in [1, num_experts={num_experts}] for the ReMoLE controller")
        self.target_sparsity = 1.0 - target_k / num_experts
        self.rate = float(rate)
        self.coefficient: torch.Tensor = torch.tensor(float(initial))

    def penalty(self, records: Sequence[RoutingRecord]) -> torch.Tensor:
        """c_t · L1 (call :meth:`update` once per optimiser step afterwards)."""
        l1 = l1_penalty(records)
        self.coefficient = self.coefficient.to(l1.device)
        return self.coefficient * l1

    @torch.no_grad()
    def update(self, records: Sequence[RoutingRecord], measured_sparsity: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One controller step from the records' measured sparsity (1 - active fraction); returns c."""
        relu_records = [r for r in records if r.router == "relu"]
        if measured_sparsity is None:
            measured_sparsity = 1.0 - active_expert_fraction(relu_records)
        measured_sparsity = measured_sparsity.to(self.coefficient.device)
        self.coefficient = self.coefficient * self.rate ** torch.sign(self.target_sparsity - measured_sparsity)
        return self.coefficient

    def state_dict(self) -> dict:
        return {"coefficient": self.coefficient.detach().cpu(), "target_sparsity": self.target_sparsity, "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.coefficient = state["coefficient"].clone()
        self.target_sparsity = float(state["target_sparsity"])
        self.rate = float(state["rate"])
