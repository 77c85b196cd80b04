"""A tiny LD-MoLE run with ``compile=true`` against the same run in eager mode: the same logged losses at every
step (dropout masks included) and the same selection and evaluation results, to float round-off."""

from __future__ import annotations

import json

import pytest
import torch._dynamo
from torch._dynamo.utils import counters

from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import train
from tests.helpers import tiny_run

# 8 training examples in batches of 4: 2 optimiser steps per epoch, 2 epochs, every step logged.
TINY = ("method=ldmole", "train_max_examples=8", "eval_max_examples=8", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=4", "log_every=1", "num_epochs=2", "save_epoch_adapters=[]", "mixed_precision=no",
        "sparsity_coef=0.1")


@pytest.mark.slow
def test_compiled_run_logs_the_eager_runs_losses(tmp_path):
    logs, metrics, graphs = {}, {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / ("compiled" if compiled else "eager")
        train(compose_config(tiny_run(*TINY, f"compile={str(compiled).lower()}", f"output_dir={out}")))
        graphs[compiled] = counters["stats"]["unique_graphs"]
        logs[compiled] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        metrics[compiled] = json.loads((out / "metrics.json").read_text())
    # graphs: layer 0 (input without grad) and the rest, in training and in evaluation; fewer than dynamo's
    # recompile limit (8), which would send further layers back to eager
    assert graphs[False] == 0 and 2 <= graphs[True] < 8, graphs
    eager, compiled = logs[False], logs[True]
    steps = [entry for entry in eager if "lr" in entry]
    assert len(steps) == 4 and [e["step"] for e in steps] == [e["step"] for e in compiled if "lr" in e]
    for ours, theirs in zip(eager, compiled):
        assert ours.keys() == theirs.keys()
        for key in ("task", "lb", "sparsity"):
            if key in ours:
                assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-6), (ours, theirs)
    assert metrics[True]["accuracy"] == metrics[False]["accuracy"]
    assert metrics[True]["routing"]["avg_active_experts"] == pytest.approx(
        metrics[False]["routing"]["avg_active_experts"], rel=1e-4)
    assert metrics[True]["routing"]["lambda"]["mean"] == pytest.approx(metrics[False]["routing"]["lambda"]["mean"],
                                                                       rel=1e-4)
