"""What a run reports to its tracker (``report_to``): selection accuracy per epoch, final metrics and
the routing summary as scalar tags, and (where tensorboard is installed) the event files a run writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ldmole.experiment.metrics import RunMetrics
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import final_scalars, routing_scalars
from tests.helpers import needs_data, tiny_run_args

SUMMARY = {
    "num_modules": 4, "avg_active_experts": 2.5, "zero_activation_rate": 0.0,
    "per_layer": {"0": {"avg_active_experts": 3.0, "zero_activation_rate": 0.0},
                  "11": {"avg_active_experts": 2.0, "zero_activation_rate": 0.0}},
    "per_module_type": {}, "per_module": {},
    "lambda": {"mean": -1.2, "quantiles": {"q05": -2.0, "q25": -1.5, "q50": -1.1, "q75": -0.8, "q95": -0.4},
               "per_layer_mean": {}, "per_layer_quantiles": {}},
}


def test_routing_scalars_flatten_overall_per_layer_and_lambda_quantiles():
    assert routing_scalars(SUMMARY) == {
        "routing/avg_active_experts": 2.5, "routing/zero_activation_rate": 0.0,
        "routing/layer_00/active_experts": 3.0, "routing/layer_11/active_experts": 2.0,
        "routing/lambda_mean": -1.2, "routing/lambda_q05": -2.0, "routing/lambda_q50": -1.1,
        "routing/lambda_q95": -0.4}


def test_routing_scalars_leave_out_lambda_for_routers_without_it_and_empty_summaries():
    without_lambda = {k: v for k, v in SUMMARY.items() if k != "lambda"}
    assert not any("lambda" in tag for tag in routing_scalars(without_lambda))
    assert routing_scalars({}) == {}


def test_final_scalars_hold_accuracy_and_only_the_task_metrics_present():
    metrics = RunMetrics(model="m", task="mmlu_pro", method="ldmole", seed=1, accuracy=0.4, best_selection_accuracy=0.5,
                         per_category={"computer science": {"accuracy": 0.25, "count": 4}})
    assert final_scalars(metrics) == {"final/accuracy": 0.4, "final/best_selection_accuracy": 0.5,
                                      "final/category/computer_science/accuracy": 0.25}
    cola = RunMetrics(model="m", task="cola", method="ldmole", seed=1, accuracy=0.7, mcc=0.3)
    assert final_scalars(cola) == {"final/accuracy": 0.7, "final/mcc": 0.3}


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of every tensorboard event file under ``directory``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars


@pytest.mark.slow
@needs_data
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed: pip install 'tensorboard>=2.14' or pip install -e '.[tensorboard]'")
def test_tensorboard_run_logs_selection_accuracy_final_metrics_and_routing(tmp_path):
    from ldmole.experiment.trainer import train

    # 8 examples in batches of 4: 2 optimiser steps per epoch, epochs end at steps 2 and 4.
    metrics = train(compose_config(tiny_run_args(task="arc_e") + [
        "method=ldmole", "train_max_examples=8", "eval_max_examples=4", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=4", "num_epochs=2", "log_every=1", "save_epoch_adapters=[]", "mixed_precision=no",
        "report_to=tensorboard", f"output_dir={tmp_path}"]))
    scalars = read_scalars(tmp_path)

    assert [step for step, _ in scalars["task"]] == [1, 2, 3, 4], "step losses are logged as before"
    assert scalars["selection/accuracy"] == [
        (h["step"], pytest.approx(h["selection_accuracy"])) for h in metrics.history], "one per epoch, at its last step"
    assert [step for step, _ in scalars["selection/accuracy"]] == [2, 4]
    assert scalars["final/accuracy"] == [(4, pytest.approx(metrics.accuracy))]
    assert scalars["routing/avg_active_experts"] == [(4, pytest.approx(metrics.routing["avg_active_experts"]))]
    for layer in range(4):  # tiny_qwen3 has 4 decoder layers
        assert scalars[f"routing/layer_{layer:02d}/active_experts"] == [
            (4, pytest.approx(metrics.routing["per_layer"][str(layer)]["avg_active_experts"]))]
    assert scalars["routing/lambda_q50"] == [(4, pytest.approx(metrics.routing["lambda"]["quantiles"]["q50"]))]
    assert scalars["routing/zero_activation_rate"] == [(4, pytest.approx(metrics.routing["zero_activation_rate"]))]
