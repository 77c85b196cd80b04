"""Routing statistics accumulated over evaluation batches: active experts, λ, zero activations; and,
when asked, the per-token routing that the figures (``ldmole.report.routing_plots``) are drawn from."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..core.config import DEFAULT_TARGET_MODULES
from ..core.records import RoutingRecord

__all__ = ["RoutingStats", "ModuleKey", "MODULE_ORDER", "LAMBDA_RANGE", "LAMBDA_BINS", "ACTIVE_QUANTILES"]

ModuleKey = tuple[int, str]  # (layer index, module type)
MODULE_ORDER = DEFAULT_TARGET_MODULES

LAMBDA_RANGE = (-10.0, 1.0)  # λ below -10 is counted in the first bin (it is effectively dense)
LAMBDA_BINS = 1100           # 0.01 wide
ACTIVE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RoutingStats:
    """Sums over real tokens, kept on the device (no host sync per batch) until :meth:`summary`.

    Per module: tokens, Σ active experts, tokens with zero active experts, Σλ, and per-expert
    activation counts; per module a histogram of the active count (0..E) and a λ histogram
    (0.01-wide bins on [-10, 1)). ``reduce`` (e.g. ``accelerator.reduce(t, "sum")``) combines
    processes before the summary.

    With ``keep_tokens=True`` it also keeps, on the host and over the real tokens of every batch in
    order, what the routing figures need: the token ids and example lengths, and per module (keyed
    by ``(layer, module_type)``) the active count, λ and the routing weights (float16, for display)
    of every token, and exact per-expert weight sums. :meth:`update` then needs the batch.
    """

    def __init__(self, keep_tokens: bool = False) -> None:
        self.keep_tokens = keep_tokens
        self._modules: list[tuple[str, int, str, int]] = []  # (name, layer, module_type, E)
        self._index: dict[str, int] = {}
        self._sums: list[torch.Tensor] = []          # [4]: tokens, active, zero, λ sum
        self._expert_counts: list[torch.Tensor] = []  # [E]
        self._active_hist: list[torch.Tensor] = []    # [E + 1]
        self._lambda_hist: list[Optional[torch.Tensor]] = []
        self.router: Optional[str] = None
        self.token_ids_parts: list[np.ndarray] = []
        self.example_lengths: list[int] = []
        self._active: dict[ModuleKey, list[np.ndarray]] = {}
        self._lam: dict[ModuleKey, list[np.ndarray]] = {}
        self._weights: dict[ModuleKey, list[np.ndarray]] = {}
        self.weight_sums: dict[ModuleKey, np.ndarray] = {}

    def update(self, records: Sequence[RoutingRecord], input_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None) -> None:
        """Adds one forward's records (weights ``[B, T, E]``); with ``keep_tokens``, the batch (``[B, T]``) too.

        A given ``attention_mask`` selects the real tokens; otherwise each record's own mask does.
        """
        if self.keep_tokens:
            if input_ids is None or attention_mask is None:
                raise ValueError("RoutingStats(keep_tokens=True).update needs the batch's input_ids and attention_mask")
            self._keep(records, input_ids, attention_mask.bool())
        for record in records:
            weights = record.weights.detach()
            num_experts = weights.shape[-1]
            if record.name not in self._index:
                self._add_module(record, weights.device)
            i = self._index[record.name]
            flat = weights.reshape(-1, num_experts)
            token_mask = attention_mask if attention_mask is not None else record.mask
            mask = (torch.ones(flat.shape[0], device=flat.device) if token_mask is None
                    else token_mask.reshape(-1).to(device=flat.device, dtype=flat.dtype)).double()
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

    def _add_module(self, record: RoutingRecord, device: torch.device) -> None:
        """Registers a module seen for the first time, with zero sums on ``device``."""
        num_experts = record.num_experts
        self._index[record.name] = len(self._modules)
        self._modules.append((record.name, record.layer_index, record.module_type, num_experts))
        self._sums.append(torch.zeros(4, device=device, dtype=torch.float64))
        self._expert_counts.append(torch.zeros(num_experts, device=device, dtype=torch.float64))
        self._active_hist.append(torch.zeros(num_experts + 1, device=device, dtype=torch.float64))
        self._lambda_hist.append(torch.zeros(LAMBDA_BINS, device=device, dtype=torch.float64)
                                 if record.lam is not None else None)

    def _keep(self, records: Sequence[RoutingRecord], input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Appends the real tokens' ids, active counts, λ and weights of one forward (host arrays)."""
        if not records:
            raise ValueError("no routing records: was the forward run on a model with MoLE routers (not router=lora)?")
        self.token_ids_parts.append(input_ids[mask.to(input_ids.device)].cpu().numpy())
        self.example_lengths.extend(int(n) for n in mask.sum(1).tolist())
        for record in records:
            if record.weights.shape[:-1] != mask.shape:
                raise ValueError(f"{record.name}: weights {tuple(record.weights.shape)} do not match the batch "
                                 f"{tuple(mask.shape)}; run full forwards (no cache) on the collected batch")
            self.router = record.router
            key = (record.layer_index, record.module_type)
            weights = record.weights.detach()[mask.to(record.weights.device)].float().cpu()
            self._active.setdefault(key, []).append((weights > 0).sum(-1).numpy().astype(np.int16))
            self._weights.setdefault(key, []).append(weights.numpy().astype(np.float16))
            sums = weights.sum(0).double().numpy()
            self.weight_sums[key] = self.weight_sums[key] + sums if key in self.weight_sums else sums
            if record.lam is not None:
                lam = record.lam.detach()[mask.to(record.lam.device)]
                self._lam.setdefault(key, []).append(lam.float().cpu().numpy())

    @property
    def modules(self) -> list[ModuleKey]:
        """Module keys sorted by layer, then in q, k, v, o, gate, up, down order."""
        rank = {name: i for i, name in enumerate(MODULE_ORDER)}
        keys = {(layer, module_type) for _, layer, module_type, _ in self._modules}
        return sorted(keys, key=lambda k: (k[0], rank.get(k[1], len(rank)), k[1]))

    @property
    def layers(self) -> list[int]:
        return sorted({layer for _, layer, _, _ in self._modules})

    @property
    def module_types(self) -> list[str]:
        return list(dict.fromkeys(module_type for _, module_type in self.modules))

    @property
    def activation_counts(self) -> dict[ModuleKey, np.ndarray]:
        """Per module, how many real tokens activated each expert (float64 ``[E]``; one host sync)."""
        return {(layer, module_type): self._expert_counts[j].cpu().numpy()
                for j, (_, layer, module_type, _) in enumerate(self._modules)}

    @property
    def token_ids(self) -> np.ndarray:
        return np.concatenate(self.token_ids_parts) if self.token_ids_parts else np.zeros(0, dtype=np.int64)

    def _kept(self, store: dict[ModuleKey, list[np.ndarray]], key: ModuleKey) -> np.ndarray:
        """One module's per-token array; only ``keep_tokens`` accumulators have them."""
        if not self.keep_tokens:
            raise ValueError("per-token routing is kept only by RoutingStats(keep_tokens=True)")
        return np.concatenate(store[key])

    def active(self, key: ModuleKey) -> np.ndarray:
        """Active expert count per token ``[N]`` of one module."""
        return self._kept(self._active, key)

    def lam(self, key: ModuleKey) -> Optional[np.ndarray]:
        """λ per token ``[N]`` of one module, or None (router without λ)."""
        return self._kept(self._lam, key) if key in self._lam else None

    def weights(self, key: ModuleKey) -> np.ndarray:
        """Routing weights per token ``[N, E]`` (float16) of one module."""
        return self._kept(self._weights, key)

    def example_slice(self, example: int) -> slice:
        """Positions of example ``example`` (in the order the examples were added) in the token axis."""
        if not 0 <= example < len(self.example_lengths):
            raise IndexError(f"example {example} is not among the {len(self.example_lengths)} collected examples")
        start = int(sum(self.example_lengths[:example]))
        return slice(start, start + self.example_lengths[example])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every accumulated sum as flat tensors (for a cross-process sum-reduce)."""
        lam = [h if h is not None else torch.zeros(LAMBDA_BINS, dtype=torch.float64, device=s.device)
               for h, s in zip(self._lambda_hist, self._sums)]
        return {"sums": torch.stack(self._sums), "experts": torch.cat(self._expert_counts),
                "active_hist": torch.cat(self._active_hist), "lambda_hist": torch.stack(lam)}

    def summary(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """JSON-ready statistics: overall, per layer and per module type (module-averaged)."""
        if not self._modules:
            return {}
        tensors = self.tensors()
        if reduce is not None:
            tensors = {k: reduce(v) for k, v in tensors.items()}
        sums = tensors["sums"].cpu()
        experts = tensors["experts"].cpu().split([m[3] for m in self._modules])
        active_hist = tensors["active_hist"].cpu().split([m[3] + 1 for m in self._modules])
        lambda_hist = tensors["lambda_hist"].cpu()
        has_lambda = [h is not None for h in self._lambda_hist]

        tokens = sums[:, 0].clamp_min(1)
        avg_active = (sums[:, 1] / tokens).tolist()
        zero_rate = (sums[:, 2] / tokens).tolist()
        lam_mean = (sums[:, 3] / tokens).tolist()
        per_module = {}
        for j, (name, layer, module_type, num_experts) in enumerate(self._modules):
            per_module[name] = {
                "layer": layer, "module_type": module_type, "num_experts": num_experts,
                "avg_active_experts": avg_active[j], "zero_activation_rate": zero_rate[j],
                "active_quantiles": _quantiles(active_hist[j], list(range(num_experts + 1))),
                "expert_share": (experts[j] / experts[j].sum().clamp_min(1)).tolist(),
                "lambda_mean": lam_mean[j] if has_lambda[j] else None,
            }

        def grouped(key: Callable[[tuple], object]) -> dict:
            groups: dict = {}
            for j, module in enumerate(self._modules):
                groups.setdefault(key(module), []).append(j)
            return {str(k): {"avg_active_experts": sum(avg_active[j] for j in js) / len(js),
                             "zero_activation_rate": sum(zero_rate[j] for j in js) / len(js)}
                    for k, js in sorted(groups.items(), key=lambda kv: kv[0])}

        result = {
            "num_modules": len(self._modules),
            "avg_active_experts": sum(avg_active) / len(avg_active),
            "zero_activation_rate": sum(zero_rate) / len(zero_rate),
            "per_layer": grouped(lambda m: m[1]),
            "per_module_type": grouped(lambda m: m[2]),
            "per_module": per_module,
        }
        lam_rows = [j for j in range(len(self._modules)) if has_lambda[j]]
        if lam_rows:
            total = lambda_hist[lam_rows].sum(0)
            centers = [LAMBDA_RANGE[0] + (b + 0.5) * (LAMBDA_RANGE[1] - LAMBDA_RANGE[0]) / LAMBDA_BINS for b in range(LAMBDA_BINS)]
            result["lambda"] = {
                "mean": sum(lam_mean[j] for j in lam_rows) / len(lam_rows),
                "quantiles": _quantiles(total, centers),
                "per_layer_mean": grouped_mean([(self._modules[j][1], lam_mean[j]) for j in lam_rows]),
                "per_layer_quantiles": {
                    str(layer): _quantiles(lambda_hist[[j for j in lam_rows if self._modules[j][1] == layer]].sum(0), centers)
                    for layer in sorted({self._modules[j][1] for j in lam_rows})},
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
