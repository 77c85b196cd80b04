"""A MoLE adapter evaluated by lm-evaluation-harness (``mole_lm``), offline, on a task over a local file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ldmole import load_mole, mole_layers
from ldmole.experiment.lm_eval_adapter import mole_lm
from ldmole.experiment.run import Run
from ldmole.experiment.run_config import compose_config
from tests.helpers import needs_data, tiny_run

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm_eval (lm-evaluation-harness) is not installed: "
                                          "pip install 'lm_eval>=0.4,<0.5' or pip install -e '.[lm-eval]'")

TASK = "ldmole_local_mc"
DOCS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "label": 2},
    {"question": "What does a thermometer measure?", "choices": ["temperature", "weight", "speed"], "label": 0},
    {"question": "Water freezes at how many degrees Celsius?", "choices": ["100", "0", "50"], "label": 1},
]


def write_local_task(directory: Path, docs: list[dict]) -> Path:
    """A multiple-choice task YAML reading its test split from a local jsonl file (no hub access)."""
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return directory


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) under ``model``, split into tokens as lm-eval splits them
    (context and continuation encoded together, the continuation's tokens after the context's)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    targets = ids[0, context_len:]
    return float(log_probs[context_len - 1:-1].gather(-1, targets[:, None]).sum())


RUN = ("method=ldmole", "train_max_examples=8", "eval_max_examples=4", "batch_size=4", "per_device_batch_size=4",
       "eval_batch_size=4", "max_steps=2", "save_epoch_adapters=[]", "mixed_precision=no")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """The ``adapter/`` of a two-step tiny random Qwen3 run on ARC-Easy (the real Qwen3 tokenizer)."""
    from ldmole.experiment.trainer import train

    out = tmp_path_factory.mktemp("run")
    train(compose_config(tiny_run(*RUN, output_dir=out, task="arc_e")))
    return out / "adapter"


@pytest.mark.slow
@needs_data
@needs_lm_eval
def test_simple_evaluate_scores_every_local_doc_with_the_mole_model(trained_adapter, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = mole_lm(trained_adapter, batch_size=4, device="cpu")
    assert mole_layers(lm.model), "HFLM must evaluate the model with its MoLE layers, not a re-loaded base"
    manager = TaskManager(include_path=str(write_local_task(tmp_path, DOCS)), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=True)

    assert results["n-samples"][TASK]["effective"] == len(DOCS)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [len(s["resps"]) for s in samples] == [len(d["choices"]) for d in DOCS], "one loglikelihood per choice"
    loglikelihoods = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    correct = [max(range(len(lls)), key=lls.__getitem__) == doc["label"] for lls, doc in zip(loglikelihoods, DOCS)]
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))

    # The scores are the adapted model's: recompute one by hand with a model built apart from mole_lm's
    # loader, the run's base as the trainer builds it (seeded) with the saved adapter loaded onto it.
    run = Run(compose_config(tiny_run(*RUN, task="arc_e")))
    model, tokenizer = load_mole(run.base_model(), trained_adapter).eval(), run.tokenizer
    expected = continuation_loglikelihood(model, tokenizer, f"Question: {DOCS[0]['question']}\nAnswer:",
                                          f" {DOCS[0]['choices'][1]}")
    assert loglikelihoods[0][1] == pytest.approx(expected, abs=1e-4)
