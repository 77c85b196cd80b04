"""Shared test helpers: repository and data paths, the shared-data skip marker, the arguments of a tiny
run on the real data (or on the in-repository fixture), running a command as a subprocess, and tiny
random Qwen3 / Llama models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LDMOLE_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
FIXTURE_DATA = REPO_ROOT / "tests" / "fixtures" / "data"
HAS_SHARED_DATA = SHARED_DATA.is_dir()
# The full data where it is (CI, the lab); on a fresh clone the first 8 rows of each split and tiny
# tokenizers shipped in the repository (tests/fixtures/data/SOURCES.md), so end-to-end tests still run.
DATA_DIR = SHARED_DATA if HAS_SHARED_DATA else FIXTURE_DATA

# For tests that need the full data (row counts, real tokenizers' chat templates); the rest use DATA_DIR.
needs_data = pytest.mark.skipif(not HAS_SHARED_DATA,
                                reason=f"shared data not found at {SHARED_DATA} (set LDMOLE_DATA_DIR)")

_TOKENIZERS = {"tiny_qwen3": "qwen3", "tiny_llama": "llama3"}


def tokenizer_dir(family: str) -> Path:
    """The tokenizer folder of a family ("qwen3", "llama3"): the real one in the shared data, else the fixture's."""
    return DATA_DIR / "tokenizers" / family


def tiny_run_args(model: str = "tiny_qwen3", task: str = "arc_c", data_dir: Path = DATA_DIR) -> list[str]:
    """``model=``, ``task=``, ``data_dir=`` and ``tokenizer=`` (the model family's) of a tiny run."""
    return [f"model={model}", f"task={task}", f"data_dir={data_dir}", f"tokenizer={tokenizer_dir(_TOKENIZERS[model])}"]


def scaled(full, fixture):
    """``full`` on the shared data, ``fixture`` on the 8-row fixture (for sizes and step counts that
    the fixture's 7 training and 8 evaluation rows cannot reach)."""
    return full if HAS_SHARED_DATA else fixture


def run_command(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


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
