"""A task registered from outside the package trains end to end and ldmole-eval rescores it."""

from __future__ import annotations

import json

import pytest

from ldmole.experiment.adapter_info import AdapterInfo
from tests.unit.test_task_registry import PIQA_LIKE, piqa_like, piqa_like_config  # noqa: F401 (fixture)


@pytest.mark.slow
def test_a_registered_task_trains_end_to_end_and_ldmole_eval_rescores_it(piqa_like, tmp_path, capsys):
    from ldmole.cli import evaluate
    from ldmole.experiment.trainer import train

    out = tmp_path / "run"
    metrics = train(piqa_like_config(piqa_like, out, "max_steps=3"))
    assert metrics.task == PIQA_LIKE and metrics.steps == 3 and metrics.num_eval_examples == 8
    assert metrics.num_train_examples == 12 and metrics.eval_split == "validation"
    assert sum(metrics.label_counts.values()) == 8 and set(metrics.prediction_counts) <= {"0", "1"}
    assert metrics.routing["avg_active_experts"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "task" in entry] == [1, 2, 3]
    info = AdapterInfo.read(out / "adapter")
    assert (info.task, info.model_kind) == (PIQA_LIKE, "causal_lm")
    assert evaluate.main([str(out), "--device", "cpu"]) == 0
    assert "reproduces metrics.json" in capsys.readouterr().out
