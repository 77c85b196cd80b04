"""A run with ``report_to=tensorboard`` writes selection accuracy, final metrics and routing as scalars."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ldmole.experiment.run_config import compose_config
from tests.helpers import needs_data, tiny_run


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
    metrics = train(compose_config(tiny_run(
        "method=ldmole", "train_max_examples=8", "eval_max_examples=4", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=4", "num_epochs=2", "log_every=1", "save_epoch_adapters=[]", "mixed_precision=no",
        "report_to=tensorboard", f"output_dir={tmp_path}", task="arc_e")))
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
