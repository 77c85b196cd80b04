"""The model wrapper that training and evaluation call: the decoder body everywhere, the head only at the
positions a batch names (never the full vocabulary logits of every position)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SelectedLogits", "language_model_parts"]


def language_model_parts(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(decoder returning hidden states, output head) of a transformers causal-LM or classifier."""
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if body is model or head is None:
        raise ValueError(f"{type(model).__name__}: expected a transformers model with a decoder body and a head")
    return body, head


class SelectedLogits(nn.Module):
    """Runs the decoder body and applies the head only at chosen positions (never the full vocab
    logits of every position). ``positions [B, K]`` -> logits ``[B, K, out]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A plain tuple, not submodules: registered again, body and head would be reached twice, which
        # FSDP1's auto-wrap rejects ("Child module ... is already wrapped"), and the state dict would repeat them.
        self.parts = language_model_parts(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        body, head = self.parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return head(picked)
