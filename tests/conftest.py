"""Shared test fixtures: tiny random Qwen3 / Llama models built from configs (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LDMOLE_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def tiny_model(family: str, task: str = "causal_lm", num_layers: int = 4, seed: int = 0, num_labels: int = 2):
    """A tiny randomly initialised Qwen3 or Llama model (causal LM or sequence classification)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3ForSequenceClassification)

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, num_labels=num_labels)
    torch.manual_seed(seed)
    if family == "qwen3":
        config = Qwen3Config(head_dim=8, **common)
        cls = Qwen3ForCausalLM if task == "causal_lm" else Qwen3ForSequenceClassification
    elif family == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM if task == "causal_lm" else LlamaForSequenceClassification
    else:
        raise ValueError(family)
    return cls(config).eval()


@pytest.fixture(params=["qwen3", "llama"])
def family(request):
    return request.param
