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


def tiny_run(*extra: str, model: str = "tiny_qwen3", task: str = "arc_c", data_dir: Path = DATA_DIR,
             output_dir: Path | str | None = None) -> list[str]:
    """The arguments of a tiny run (:func:`tiny_run_args`) followed by ``extra`` overrides and, when
    given, ``output_dir=``: the one way the tests spell a tiny training or evaluation run."""
    args = tiny_run_args(model, task, data_dir) + list(extra)
    return args + ([f"output_dir={output_dir}"] if output_dir is not None else [])


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


def rescore(adapter: Path, config, split: str = "evaluation", limit: int | None = None, autocast=None,
            source: bool = False):
    """An adapter scored here, apart from the trainer's and ``ldmole-eval``'s scoring loop: the run's
    base rebuilt from its seed with ``load_mole``, each batch of ``eval_collate`` through
    ``SelectedLogits``, the fraction of argmax predictions equal to the gold answer, and a fresh
    ``RoutingStats`` fed the routing records of every forward (``autocast``: a context factory, as the
    run's mixed precision). Returns ``(accuracy, routing summary)``."""
    from contextlib import nullcontext

    from ldmole import load_mole
    from ldmole.core.records import routing_records
    from ldmole.experiment.routing_stats import RoutingStats
    from ldmole.experiment.run import Run
    from ldmole.experiment.selected_logits import SelectedLogits

    run = Run(config)
    model = load_mole(run.base_model(), adapter).eval()
    # A run scores ``Run.examples`` (capped at eval_max_examples); ldmole-eval the first ``limit`` of ``source_examples``.
    examples = (run.source_examples if source else run.examples)(split)[:limit]
    stats, correct = RoutingStats(), []
    with torch.no_grad():
        for batch in run.loader(examples):
            with autocast() if autocast is not None else nullcontext():
                logits = SelectedLogits(model)(batch["input_ids"], batch["attention_mask"], batch["positions"])
            stats.update(routing_records(model))
            scores, gold = run.task.task_kind.scores(logits[:, 0].float(), batch)
            correct += (scores.argmax(-1) == gold).tolist()
    return sum(correct) / len(correct), stats.summary()


def tiny_run_config(*overrides: str):
    """The composed config (``RunConfig``) of a tiny random Qwen3 run on ARC-Easy, seed 7."""
    from ldmole.experiment.run_config import compose_config

    return compose_config(["model=tiny_qwen3", "task=arc_e", f"tokenizer={tokenizer_dir('qwen3')}", "seed=7",
                           *overrides])


def trained_tiny_model(config, router: str = "sparsegen"):
    """The run's tiny random base built as the trainer builds it (seeded), with perturbed adapter weights."""
    from accelerate.utils import set_seed

    from ldmole import MoLEConfig, get_mole_model, mole_parameters
    from ldmole.experiment.models import load_base_model, load_tokenizer

    set_seed(config.seed)
    model = load_base_model(config.backbone, "causal_lm", load_tokenizer(config.backbone.tokenizer))
    get_mole_model(model, MoLEConfig(router=router, num_experts=1 if router == "lora" else 4, r=4))
    with torch.no_grad():
        for p in mole_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
