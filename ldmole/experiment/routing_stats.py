"""Routing statistics accumulated over evaluation batches: active experts, λ, zero activations."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..core.records import RoutingRecord

__all__ = ["RoutingStats", "LAMBDA_RANGE", "LAMBDA_BINS", "ACTIVE_QUANTILES"]

LAMBDA_RANGE = (-10.0, 1.0)  # λ below -10 is counted in the first bin (it is effectively dense)
LAMBDA_BINS = 1100           # 0.01 wide
ACTIVE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RoutingStats:
    """Sums over real tokens, kept on the device (no host sync per batch) until :meth:`summary`.

    Per module: tokens, Σ active experts, tokens with zero active experts, Σλ, and per-expert
    activation counts; per module a histogram of the active count (0..E) and a λ histogram
    (0.01-wide bins on [-10, 1)). ``reduce`` (e.g. ``accelerator.reduce(t, "sum")``) combines
    processes before the summary.
    """

    def __init__(self) -> None:
        self.modules: list[tuple[str, int, str, int]] = []  # (name, layer, module_type, E)
        self._index: dict[str, int] = {}
        self._sums: list[torch.Tensor] = []          # [4]: tokens, active, zero, λ sum
        self._expert_counts: list[torch.Tensor] = []  # [E]
        self._active_hist: list[torch.Tensor] = []    # [E + 1]
        self._lambda_hist: list[Optional[torch.Tensor]] = []

    def update(self, records: Sequence[RoutingRecord]) -> None:
        """Adds one forward's records."""
        for record in records:
            weights = record.weights.detach()
            num_experts = weights.shape[-1]
            if record.name not in self._index:
                device = weights.device
                self._index[record.name] = len(self.modules)
                self.modules.append((record.name, record.layer_index, record.module_type, num_experts))
                self._sums.append(torch.zeros(4, device=device, dtype=torch.float64))
                self._expert_counts.append(torch.zeros(num_experts, device=device, dtype=torch.float64))
                self._active_hist.append(torch.zeros(num_experts + 1, device=device, dtype=torch.float64))
                self._lambda_hist.append(torch.zeros(LAMBDA_BINS, device=device, dtype=torch.float64)
                                         if record.lam is not None else None)
            i = self._index[record.name]
            flat = weights.reshape(-1, num_experts)
            mask = (torch.ones(flat.shape[0], device=flat.device) if record.mask is None
                    else record.mask.reshape(-1).to(flat.dtype)).double()
            active_pairs = (flat > 0).double() * mask[:, None]
            active = active_pairs.sum(-1)
            lam_sum = torch.zeros((), device=flat.device, dtype=torch.float64)
            if record.lam is not None:
                lam = record.lam.detach().reshape(-1).double()
                lam_sum = (lam * mask).sum()
                bins = ((lam.clamp(*LAMBDA_RANGE) - LAMBDA_RANGE[0]) / (LAMBDA_RANGE[1] - LAMBDA_RANGE[0]) * LAMBDA_BINS)
                self._lambda_hist[i].index_add_(0, bins.long().clamp(0, LAMBDA_BINS - 1), mask)
            zero = ((active == 0).double() * mask).sum()
            self._sums[i] += torch.stack([mask.sum(), active.sum(), zero, lam_sum])
            self._expert_counts[i] += active_pairs.sum(0)
            self._active_hist[i].index_add_(0, active.long(), mask)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every accumulated sum as flat tensors (for a cross-process sum-reduce)."""
        lam = [h if h is not None else torch.zeros(LAMBDA_BINS, dtype=torch.float64, device=s.device)
               for h, s in zip(self._lambda_hist, self._sums)]
        return {"sums": torch.stack(self._sums), "experts": torch.cat(self._expert_counts),
                "active_hist": torch.cat(self._active_hist), "lambda_hist": torch.stack(lam)}

    def summary(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """JSON-ready statistics: overall, per layer and per module type (module-averaged)."""
        if not self.modules:
            return {}
        tensors = self.tensors()
        if reduce is not None:
            tensors = {k: reduce(v) for k, v in tensors.items()}
        sums = tensors["sums"].cpu()
        experts = tensors["experts"].cpu().split([m[3] for m in self.modules])
        active_hist = tensors["active_hist"].cpu().split([m[3] + 1 for m in self.modules])
        lambda_hist = tensors["lambda_hist"].cpu()
        has_lambda = [h is not None for h in self._lambda_hist]

        tokens = sums[:, 0].clamp_min(1)
        avg_active = (sums[:, 1] / tokens).tolist()
        zero_rate = (sums[:, 2] / tokens).tolist()
        lam_mean = (sums[:, 3] / tokens).tolist()
        per_module = {}
        for j, (name, layer, module_type, num_experts) in enumerate(self.modules):
            per_module[name] = {
                "layer": layer, "module_type": module_type, "num_experts": num_experts,
                "avg_active_experts": avg_active[j], "zero_activation_rate": zero_rate[j],
                "active_quantiles": _quantiles(active_hist[j], list(range(num_experts + 1))),
                "expert_share": (experts[j] / experts[j].sum().clamp_min(1)).tolist(),
                "lambda_mean": lam_mean[j] if has_lambda[j] else None,
            }

        def grouped(key: Callable[[tuple], object]) -> dict:
            groups: dict = {}
            for j, module in enumerate(self.modules):
                groups.setdefault(key(module), []).append(j)
            return {str(k): {"avg_active_experts": sum(avg_active[j] for j in js) / len(js),
                             "zero_activation_rate": sum(zero_rate[j] for j in js) / len(js)}
                    for k, js in sorted(groups.items(), key=lambda kv: kv[0])}

        result = {
            "num_modules": len(self.modules),
            "avg_active_experts": sum(avg_active) / len(avg_active),
            "zero_activation_rate": sum(zero_rate) / len(zero_rate),
            "per_layer": grouped(lambda m: m[1]),
            "per_module_type": grouped(lambda m: m[2]),
            "per_module": per_module,
        }
        lam_rows = [j for j in range(len(self.modules)) if has_lambda[j]]
        if lam_rows:
            total = lambda_hist[lam_rows].sum(0)
            centers = [LAMBDA_RANGE[0] + (b + 0.5) * (LAMBDA_RANGE[1] - LAMBDA_RANGE[0]) / LAMBDA_BINS for b in range(LAMBDA_BINS)]
            result["lambda"] = {
                "mean": sum(lam_mean[j] for j in lam_rows) / len(lam_rows),
                "quantiles": _quantiles(total, centers),
                "per_layer_mean": grouped_mean([(self.modules[j][1], lam_mean[j]) for j in lam_rows]),
                "per_layer_quantiles": {
                    str(layer): _quantiles(lambda_hist[[j for j in lam_rows if self.modules[j][1] == layer]].sum(0), centers)
                    for layer in sorted({self.modules[j][1] for j in lam_rows})},
            }
        return result


def grouped_mean(pairs: list[tuple[int, float]]) -> dict[str, float]:
    """{key: mean of values} for (key, value) pairs."""
    groups: dict[int, list[float]] = {}
    for key, value in pairs:
        groups.setdefault(key, []).append(value)
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}


def _quantiles(histogram: torch.Tensor, values: list[float]) -> dict[str, float]:
    """Quantiles ACTIVE_QUANTILES of a histogram over ``values`` (the value of the bin reached)."""
    cdf = histogram.double().cumsum(0)
    total = float(cdf[-1]) if len(cdf) else 0.0
    if total <= 0:
        return {}
    out = {}
    for q in ACTIVE_QUANTILES:
        index = int(torch.searchsorted(cdf, torch.tensor(q * total, dtype=torch.float64)).clamp(max=len(values) - 1))
        out[f"q{int(q * 100):02d}"] = round(float(values[index]), 4)
    return out
