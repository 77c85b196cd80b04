"""Routing records: what each MoLE layer routed in the last forward, for the losses and statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["RoutingRecord", "RoutingContext", "routing_records", "routing_context_of", "attach_routing_context"]

# Where get_mole_model keeps a model's context; read and written only through the two functions below.
_MODEL_CONTEXT_ATTR = "ldmole_routing_context"


@dataclass
class RoutingRecord:
    """One MoLE layer's routing in the last forward.

    Attributes:
        name: qualified module name (``model.layers.3.self_attn.q_proj``).
        layer_index: decoder layer index parsed from the name (0 when the name has none).
        module_type: last name component (``q_proj``).
        router: the router kind (see ``MoLEConfig.router``).
        scores: ``[..., E]`` float32 gating scores u.
        weights: ``[..., E]`` float32 routing weights p.
        lam: ``[...]`` float32 λ for Sparsegen routers, else None.
        mask: ``[...]`` bool, True on real tokens, or None when no 2-D attention mask was given.
    """

    name: str
    layer_index: int
    module_type: str
    router: str
    scores: torch.Tensor
    weights: torch.Tensor
    lam: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]

    @property
    def num_experts(self) -> int:
        return self.weights.shape[-1]


class RoutingContext:
    """State shared by the MoLE layers of one model for the duration of a forward.

    The model's forward pre-hook calls :meth:`begin` (the attention mask, no layer's routing kept, empty
    λ memos), its forward hook calls :meth:`end`. A layer keeps its routing tensors (``last_routing``:
    scores, weights, λ) only between the two, so the recomputation that gradient checkpointing runs
    during backward changes no record. :attr:`records` builds the records from the layers when they are
    read, with the token mask, so a forward does no bookkeeping a run does not read. A layer used on its
    own gets a ``standalone`` context that always records and keeps only its last forward.

    Attributes:
        layers: the MoLE layers recording into this context (in module order).
        lambda_mlps: the λ-MLPs whose memos a forward starts and ends with empty.
    """

    def __init__(self, standalone: bool = False) -> None:
        self.standalone = standalone
        self.recording = standalone
        self.mask: Optional[torch.Tensor] = None
        self.layers: list[nn.Module] = []
        self.lambda_mlps: list[nn.Module] = []
        self._depth = 0  # nested entry points (model -> its decoder body) share one forward

    def _clear_lambda_caches(self) -> None:
        for mlp in self.lambda_mlps:
            mlp.clear_cache()

    def begin(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Starts a model forward: no layer's routing kept, this forward's 2-D attention mask (or None)."""
        self._depth += 1
        if self._depth > 1:
            return
        for layer in self.layers:
            layer.last_routing = None
        self.mask = attention_mask if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 else None
        self._clear_lambda_caches()
        self.recording = True

    def end(self) -> None:
        """Ends a model forward: stops recording and releases the remembered λ inputs."""
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.recording = False
            self._clear_lambda_caches()

    def token_mask(self, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """The attention mask aligned with ``scores [B, T, E]``: its last T columns (decode-safe)."""
        mask = self.mask
        if mask is None or scores.dim() != 3 or mask.shape[0] != scores.shape[0] or mask.shape[1] < scores.shape[1]:
            return None
        return mask[:, mask.shape[1] - scores.shape[1]:].bool()

    @property
    def records(self) -> dict[str, RoutingRecord]:
        """The routing of every layer that ran in the last forward, by layer name, in module order."""
        masks: dict[tuple, Optional[torch.Tensor]] = {}  # one token mask per routed shape
        records: dict[str, RoutingRecord] = {}
        for layer in self.layers:
            routing = layer.last_routing
            if routing is None:
                continue
            scores, weights, lam = routing
            shape = tuple(scores.shape[:-1])
            if shape not in masks:
                masks[shape] = self.token_mask(scores)
            records[layer.name] = RoutingRecord(layer.name, layer.layer_index, layer.module_type, layer.router_name,
                                                scores, weights, lam, masks[shape])
        return records


def attach_routing_context(model: nn.Module, context: RoutingContext) -> None:
    """Makes ``context`` the one :func:`routing_context_of` returns for ``model`` (get_mole_model calls it)."""
    setattr(model, _MODEL_CONTEXT_ATTR, context)


def routing_context_of(module: nn.Module) -> Optional[RoutingContext]:
    """The ``RoutingContext`` of a MoLE model (the one get_mole_model attached), or of one ``MoLELinear``
    (its own, or its model's); None for a module that has neither."""
    context = getattr(module, _MODEL_CONTEXT_ATTR, None)
    if not isinstance(context, RoutingContext):
        context = getattr(module, "routing_context", None)
    return context if isinstance(context, RoutingContext) else None


def routing_records(model: nn.Module) -> list[RoutingRecord]:
    """The records of every MoLE layer of ``model`` (or of one ``MoLELinear``) from its last forward.

    Read from the model's :func:`routing_context_of`; only a module without one (a wrapper around the
    model, or layers assembled by hand) is scanned for its layers' contexts.
    """
    context = routing_context_of(model)
    if context is not None:
        return list(context.records.values())
    contexts: list[RoutingContext] = []
    for module in model.modules():
        ctx = getattr(module, "routing_context", None)
        if isinstance(ctx, RoutingContext) and all(ctx is not c for c in contexts):
            contexts.append(ctx)
    return [record for ctx in contexts for record in ctx.records.values()]
