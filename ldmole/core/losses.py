"""Auxiliary routing losses over routing records: load balance, λ sparsity, z-loss, ReMoLE L1.

Every loss is computed per module over real tokens (the record's attention mask, when present)
and averaged over modules. None of them syncs with the host.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .records import RoutingRecord
from .routers import get_router
from .sparsegen import lambda_lower_bound

__all__ = [
    "load_balance_loss", "sparsity_loss", "router_z_loss", "l1_penalty", "balanced_l1_penalty",
    "ReMoLEL1Controller", "active_expert_fraction", "LB_PROBS", "REMOLE_L1_FORMS",
]

# Where the load balance's P comes from (load_balance_loss's probs; the run config's choice list).
LB_PROBS = ("weights", "softmax")
# ReMoLE's L1 term (ReMoLEL1Controller's form; the run config's choice list): ReMoE's load-balanced L1, or the
# plain L1.
REMOLE_L1_FORMS = ("balanced", "plain")


def _applies(loss: str, record: RoutingRecord) -> bool:
    """Whether auxiliary ``loss`` (a name in ``AUX_LOSSES``) applies to the record's router."""
    return loss in get_router(record.router).aux_losses


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


def load_balance_loss(records: Sequence[RoutingRecord], dense_top_k: int = 1, probs: str = "weights") -> torch.Tensor:
    """L_lb = E Σ_i f_i P_i per module, averaged over modules (docs/method.md §3).

    P_i is the mean over real tokens of expert i's routing weight (carries the gradient); with
    ``probs="softmax"`` records of routers whose weights are a renormalised selection of the softmax
    (``Router.selects_from_softmax``: topk) take it from the full softmax of the scores instead (MoLA's
    own form; other routers are unaffected). f_i is the share of all (token, expert) activations that
    go to expert i (no gradient). For dense routers (``Router.dense``: softmax) every expert is always
    active, which makes the loss identically 1: there f_i comes from each token's ``dense_top_k``
    highest-weight experts instead (the Switch form). Modules with one expert, and routers without
    "lb" in their ``aux_losses``, are skipped.
    """
    if probs not in LB_PROBS:
        raise ValueError(f"load_balance_loss: probs={probs!r} is unknown; choose one of {LB_PROBS}")
    losses = []
    for record in records:
        router = get_router(record.router)
        weights, mask = _flat(record, record.weights)
        num_experts = weights.shape[-1]
        if num_experts < 2 or "lb" not in router.aux_losses:
            continue
        token_count = mask.sum().clamp_min(1.0)
        p = weights
        if probs == "softmax" and router.selects_from_softmax:
            p, _ = _flat(record, torch.softmax(record.scores, dim=-1))
        mean_weight = (p * mask[:, None]).sum(0) / token_count
        with torch.no_grad():
            if router.dense:
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
    Only records of routers with "sparsity" in their ``aux_losses`` (Sparsegen with a learned λ) take part.
    ``k`` is checked once per call (the run config checks its range at the edge), not per module.
    """
    if k < 1:
        raise ValueError(f"sparsity_loss: k={k} must be >= 1 (the target number of active experts)")
    losses = []
    for record in records:
        if record.lam is None or not _applies("sparsity", record):
            continue
        num_experts = record.scores.shape[-1]
        if k >= num_experts:
            losses.append(record.lam.sum() * 0.0)
            continue
        lower = lambda_lower_bound(record.scores.detach(), k)
        hinge = torch.relu(lower - record.lam).reshape(-1)
        _, mask = _flat(record, record.scores)
        losses.append((hinge * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def router_z_loss(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(u)², averaged over routed modules (routers with
    "z" in their ``aux_losses``)."""
    losses = []
    for record in records:
        if record.scores.shape[-1] < 2 or not _applies("z", record):
            continue
        scores, mask = _flat(record, record.scores)
        z = torch.logsumexp(scores, dim=-1).square()
        losses.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def l1_penalty(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """Plain L1: mean over real tokens of Σ_e p_e, averaged over modules of routers with "l1" in their
    ``aux_losses`` (ReLU)."""
    losses = []
    for record in records:
        if not _applies("l1", record):
            continue
        weights, mask = _flat(record, record.weights)
        losses.append((weights.sum(-1) * mask).sum() / mask.sum().clamp_min(1.0))
    return _mean_over(losses, records)


def balanced_l1_penalty(records: Sequence[RoutingRecord], target_k: int) -> torch.Tensor:
    """ReMoE's load-balanced L1: E Σ_e P_e n_e / (N k) per module of a router with "l1" in its
    ``aux_losses`` (ReLU), averaged over modules.

    N is the number of real tokens, P_e = Σ_t p_te / N the mean weight of expert e (carries the
    gradient), n_e the number of real tokens routed to e (no gradient) and k = ``target_k``. Each
    expert's L1 is weighted by its activation count, so busy experts are pushed harder; the share
    is normalised by N k (the target activation count), not by the actual Σ_e n_e.
    """
    losses = []
    for record in records:
        if not _applies("l1", record):
            continue
        weights, mask = _flat(record, record.weights)
        token_count = mask.sum().clamp_min(1.0)
        mean_weight = (weights * mask[:, None]).sum(0) / token_count
        with torch.no_grad():
            routed = ((weights > 0).to(weights.dtype) * mask[:, None]).sum(0)
        losses.append(weights.shape[-1] * (mean_weight * routed).sum() / (token_count * target_k))
    return _mean_over(losses, records)


def _active_fraction(record: RoutingRecord) -> torch.Tensor:
    """Fraction of one record's (real token, expert) pairs with a non-zero weight (no gradient)."""
    weights, mask = _flat(record, record.weights.detach())
    active = (weights > 0).to(weights.dtype).mean(-1)
    return (active * mask).sum() / mask.sum().clamp_min(1.0)


def active_expert_fraction(records: Sequence[RoutingRecord]) -> torch.Tensor:
    """Mean over modules of the fraction of (real token, expert) pairs with a non-zero weight."""
    return _mean_over([_active_fraction(record) for record in records], records)


class ReMoLEL1Controller:
    """ReMoE's adaptive L1 coefficient, updated once per optimiser step.

    Every micro-batch, :meth:`observe` adds the mean, over the modules of routers with "l1" in their
    ``aux_losses`` (ReLU), of (measured sparsity - target sparsity), with measured sparsity = 1 - active
    fraction over real tokens and target 1 - k/E of that module's own E (so layers with different expert counts each
    aim at k active experts). :meth:`update` then averages over the step's micro-batches and sets
    c ← c · rate when the step was below target, else c ← c / rate. The coefficient and the
    accumulators stay device tensors, so nothing syncs with the host.
    """

    def __init__(self, target_k: int, initial: float = 1e-8, rate: float = 1.2, form: str = "balanced") -> None:
        if isinstance(target_k, bool) or not isinstance(target_k, int) or target_k < 1:
            raise ValueError(f"ReMoLEL1Controller: target_k={target_k!r} must be a positive int (the target number "
                             "of active experts, MoLEConfig.top_k)")
        if not float(initial) > 0:
            raise ValueError(f"ReMoLEL1Controller: initial={initial} must be > 0 (ReMoE starts at 1e-8)")
        if not float(rate) > 1:
            raise ValueError(f"ReMoLEL1Controller: rate={rate} must be > 1 (ReMoE uses 1.2)")
        if form not in REMOLE_L1_FORMS:
            raise ValueError(f"ReMoLEL1Controller: form={form!r} is unknown; choose one of {REMOLE_L1_FORMS}")
        self.target_k = target_k
        self.rate = float(rate)
        self.form = form
        self.coefficient: torch.Tensor = torch.tensor(float(initial))
        self._gap_sum: torch.Tensor = torch.zeros(())
        self._observed = 0  # micro-batches observed since the last update (a host int, no sync)

    def penalty(self, records: Sequence[RoutingRecord]) -> torch.Tensor:
        """c_t · L1 in the configured form (balanced or plain)."""
        l1 = balanced_l1_penalty(records, self.target_k) if self.form == "balanced" else l1_penalty(records)
        self.coefficient = self.coefficient.to(l1.device)
        return self.coefficient * l1

    @torch.no_grad()
    def observe(self, records: Sequence[RoutingRecord]) -> None:
        """Adds one micro-batch's sparsity gap (measured - target, mean over the L1-penalised modules)."""
        gaps = [self.target_k / r.num_experts - _active_fraction(r) for r in records if _applies("l1", r)]
        if not gaps:
            raise ValueError("the ReMoLE controller got no records of a router with the L1 penalty "
                             "(aux_losses containing 'l1'); use MoLEConfig.router='relu'")
        gap = torch.stack(gaps).mean()
        self._gap_sum = self._gap_sum.to(gap.device) + gap
        self._observed += 1

    @torch.no_grad()
    def update(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """One controller step from the micro-batches observed since the last one; returns c.

        ``reduce`` averages the step's gap over processes (as ReMoE's all-reduce), so that every
        process keeps the same coefficient.
        """
        if not self._observed:
            raise RuntimeError("ReMoLEL1Controller.update() needs observe() on the step's micro-batches first")
        gap = self._gap_sum / self._observed
        if reduce is not None:
            gap = reduce(gap)
        below = gap.to(self.coefficient.device) < 0
        self.coefficient = torch.where(below, self.coefficient * self.rate, self.coefficient / self.rate)
        self._gap_sum = torch.zeros_like(self._gap_sum)
        self._observed = 0
        return self.coefficient

    def state_dict(self) -> dict:
        """The coefficient and settings (checkpoints are written between steps, with nothing observed)."""
        return {"coefficient": self.coefficient.detach().cpu(), "target_k": self.target_k, "rate": self.rate,
                "form": self.form}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output."""
        self.coefficient = state["coefficient"].clone()
        self.target_k = int(state["target_k"])
        self.rate = float(state["rate"])
        self.form = str(state["form"])
