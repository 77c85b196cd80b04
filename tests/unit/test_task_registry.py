"""The task registry: task kinds own encoding, scored positions, metrics and the model class; a task added
from outside the package (one spec, one converter, a few rows) trains, reports and is rescored like any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.data import (CLASSIFICATION_KIND, QA_KIND, TASKS, TaskSpec, get_task, register_task,
                                    task_kind_for_model)
from ldmole.experiment.data.examples import FieldProblem, class_index, qa_example, text_field
from ldmole.experiment.data.tasks import BUILTIN_TASKS
from ldmole.experiment.metrics import RunMetrics
from ldmole.experiment.run import Run
from ldmole.experiment.run_config import compose_config
from tests.helpers import tokenizer_dir

PIQA_LIKE = "test_piqa_like"


def piqa_like_example(row, spec, uid, training):
    """What a user writes for a PIQA-like task: a goal, two solutions, the label of the right one."""
    solutions = [text_field(row, "sol1"), text_field(row, "sol2")]
    if solutions[0] == solutions[1]:
        raise FieldProblem("sol2", "the two solutions are the same")
    return qa_example(uid, "Choose the better way to reach the goal below:", f"Goal: {text_field(row, 'goal')}",
                      solutions, class_index(row, "label", 2), blank_line=False)


PIQA_LIKE_SPEC = TaskSpec(PIQA_LIKE, QA_KIND, piqa_like_example, "PIQA-like", local_dir="piqa_like")


def write_rows(folder: Path, split: str, count: int) -> None:
    """``count`` made-up PIQA-like rows in ``folder/<split>.jsonl`` (the local-data layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"goal": f"keep item {i} cold", "sol1": f"put item {i} in the fridge", "sol2": f"put item {i} in the oven",
             "label": i % 2} for i in range(count)]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def piqa_like(tmp_path):
    """The PIQA-like task registered for one test (and removed after it), and its data root."""
    register_task(PIQA_LIKE_SPEC)
    write_rows(tmp_path / "data" / "piqa_like", "train", 24)
    write_rows(tmp_path / "data" / "piqa_like", "validation", 8)
    yield tmp_path / "data"
    TASKS.pop(PIQA_LIKE)


def piqa_like_config(data_dir: Path, output_dir: Path, *extra: str):
    """A tiny Qwen3 LD-MoLE run on the PIQA-like task, two micro-batches per optimiser step."""
    return compose_config([
        "model=tiny_qwen3", f"task={PIQA_LIKE}", "method=ldmole", f"data_dir={data_dir}",
        f"tokenizer={tokenizer_dir('qwen3')}", "selection_size=4", "train_max_examples=12", "eval_max_examples=8",
        "batch_size=4", "per_device_batch_size=2", "eval_batch_size=4", "log_every=1", "save_epoch_adapters=[]",
        "mixed_precision=no", f"output_dir={output_dir}", *extra])


def test_builtin_tasks_describe_their_kind_title_metrics_and_evaluation_size():
    assert BUILTIN_TASKS == ("arc_c", "arc_e", "csqa", "obqa", "hellaswag", "swag", "mmlu_pro", "cola", "rte", "mrpc")
    assert [n for n in BUILTIN_TASKS if get_task(n).task_kind is CLASSIFICATION_KIND] == ["cola", "rte", "mrpc"]
    assert {n: get_task(n).extra_metrics for n in BUILTIN_TASKS if get_task(n).extra_metrics} == {
        "mmlu_pro": ("per_category",), "cola": ("mcc",), "mrpc": ("f1",)}
    assert [get_task(n).title for n in ("arc_c", "mmlu_pro", "hellaswag", "cola")] == ["ARC-C", "MMLU-Pro",
                                                                                       "HellaSwag", "CoLA"]
    assert get_task("rte").eval_size == 277 and get_task("mrpc").eval_size == 408


def test_model_kind_on_disk_maps_to_the_task_kind_and_its_model_class():
    assert (QA_KIND.model_kind, CLASSIFICATION_KIND.model_kind) == ("causal_lm", "classification")
    assert task_kind_for_model("causal_lm") is QA_KIND and task_kind_for_model("classification") is CLASSIFICATION_KIND
    assert (QA_KIND.auto_model, CLASSIFICATION_KIND.auto_model) == ("AutoModelForCausalLM",
                                                                    "AutoModelForSequenceClassification")
    with pytest.raises(ValueError, match="model_kind='seq2seq' is unknown.*causal_lm, classification"):
        task_kind_for_model("seq2seq")
    config = compose_config(["model=tiny_llama", "task=rte"])
    assert AdapterInfo.from_run(config, get_task("rte")).model_kind == "classification"


def test_each_kind_scores_its_own_positions_and_metrics():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0], [2.0, 0.0, 9.0, 1.0]])
    qa_batch = {"option_token_ids": torch.tensor([[[1], [3]], [[2], [3]]]), "option_mask": torch.ones(2, 2, dtype=bool),
                "answer": torch.tensor([0, 1])}
    scores, gold = QA_KIND.scores(logits, qa_batch)
    assert scores.tolist() == [[5.0, 3.0], [9.0, 1.0]] and gold.tolist() == [0, 1]
    scores, gold = CLASSIFICATION_KIND.scores(logits[:, :2], {"label": torch.tensor([1, 0])})
    assert scores.tolist() == [[0.0, 5.0], [2.0, 0.0]] and gold.tolist() == [1, 0]
    pred, golds = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    cola = CLASSIFICATION_KIND.metrics(pred, golds, [], get_task("cola"))
    assert "mcc" in cola and "f1" not in cola
    assert "f1" in CLASSIFICATION_KIND.metrics(pred, golds, [], get_task("mrpc"))
    batch = {"last_token_index": torch.tensor([4, 2]), "label": torch.tensor([1, 0]),
             "last_prompt_index": torch.tensor([3, 1])}
    assert CLASSIFICATION_KIND.eval_positions(batch).tolist() == [[4], [2]]
    assert QA_KIND.eval_positions(batch).tolist() == [[3], [1]]


@pytest.mark.parametrize("changes, error, message", [
    (dict(name="arc_c"), ValueError, "task 'arc_c' is already registered \\(ARC-C\\); choose another name"),
    (dict(name="piqa-like"), ValueError, "name must be an identifier"),
    (dict(extra_metrics=("mcc",)), ValueError, "extra_metrics \\['mcc'\\] are not reported for a QA task; choose "
                                               "from \\['per_category'\\]"),
    (dict(task_kind=CLASSIFICATION_KIND), ValueError, "a classification task needs num_labels >= 2.*set num_labels="),
    (dict(task_kind="qa"), TypeError, "task_kind must be a TaskKind"),
    (dict(carved_from_one_split=True), ValueError, "name the same split in both"),
])
def test_register_task_names_what_is_wrong(changes, error, message):
    import dataclasses

    with pytest.raises(error, match=message):
        register_task(dataclasses.replace(PIQA_LIKE_SPEC, **changes))
    assert PIQA_LIKE not in TASKS and "piqa-like" not in TASKS


def test_a_registered_task_loads_encodes_and_batches_through_run(piqa_like, tmp_path):
    run = Run(piqa_like_config(piqa_like, tmp_path / "run"))
    assert run.task is PIQA_LIKE_SPEC and len(run.examples("train")) == 12 and len(run.examples("selection")) == 4
    example = run.examples("evaluation")[0]
    assert example.uid == f"{PIQA_LIKE}/validation/1" and example.options == ["A", "B"] and example.answer == 0
    assert example.prompt.startswith("Choose the better way to reach the goal below:\nGoal: keep item 0 cold\n")
    batch = next(iter(run.loader("evaluation")))
    assert set(batch) >= {"input_ids", "attention_mask", "positions", "option_token_ids", "answer", "example_index"}
    assert "labels" not in batch and "uid" not in batch, "scoring batches hold tensors only"
    with pytest.raises(ValueError, match="not one of the run's .*Run.source_examples"):
        run.examples("validation")
    assert len(run.source_examples("validation")) == 8


def test_a_bad_row_of_a_registered_task_names_its_file_line_and_field(piqa_like, tmp_path):
    path = piqa_like / "piqa_like" / "validation.jsonl"
    path.write_text(json.dumps({"goal": "g", "sol1": "same", "sol2": "same", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 1: field 'sol2': the two solutions are the same"):
        Run(piqa_like_config(piqa_like, tmp_path / "run")).examples("evaluation")


def test_tables_show_the_metric_the_task_spec_names(tmp_path):
    from ldmole.report.tables import PAPER_TASKS, TASK_COLUMNS, _task_metric

    assert TASK_COLUMNS == [(task, get_task(task).title) for task in PAPER_TASKS]
    both = dict(model="m", method="lora", seed=1, accuracy=0.5, mcc=0.2, f1=0.7)
    assert _task_metric(RunMetrics(task="mrpc", **both)) == ("F1", 0.7), "MRPC's spec names F1, not MCC"
    assert _task_metric(RunMetrics(task="cola", **both)) == ("MCC", 0.2)
    assert _task_metric(RunMetrics(task="rte", **both)) is None, "RTE reports accuracy only"
