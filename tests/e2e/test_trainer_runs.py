"""The training loop in real tiny runs: the logged task loss and its label smoothing, the lr schedule."""

from __future__ import annotations

import json

import pytest

import ldmole.experiment.trainer as trainer
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import task_loss, train
from tests.helpers import tiny_run
from tests.unit.test_trainer_loop import hand_smoothed_cross_entropy

# 8 training examples in batches of 4 without accumulation: 2 optimiser steps per epoch.
TINY = ("method=softmax", "train_max_examples=8", "eval_max_examples=4", "batch_size=4",
                          "per_device_batch_size=4", "eval_batch_size=4", "log_every=1", "save_epoch_adapters=[]",
                          "mixed_precision=no",)  # settings every tiny run of this file shares


@pytest.mark.slow
def test_trainer_logs_the_task_loss_with_the_configs_label_smoothing(tmp_path, monkeypatch):
    seen = []

    def recording_task_loss(logits, targets, label_smoothing):
        seen.append((logits.detach().clone(), targets.clone()))
        return task_loss(logits, targets, label_smoothing)

    monkeypatch.setattr(trainer, "task_loss", recording_task_loss)
    logged = {}
    for smoothing in (0.0, 0.5):
        seen.clear()
        out = tmp_path / f"ls{smoothing}"
        train(compose_config(tiny_run(*TINY, "max_steps=1", f"label_smoothing={smoothing}", f"output_dir={out}")))
        first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        logits, targets = seen[0]
        expected = hand_smoothed_cross_entropy(logits, targets, smoothing).item()
        assert first["task"] == pytest.approx(expected, rel=1e-4), (
            f"label_smoothing={smoothing}: the logged first-step task loss must be the smoothed cross-entropy {expected}")
        logged[smoothing] = first["task"]
    assert logged[0.0] != pytest.approx(logged[0.5], rel=1e-3), "label smoothing must change the task loss"


@pytest.mark.slow
def test_logged_lr_drops_by_gamma_at_each_epoch_milestone(tmp_path):
    lr, gamma, milestones = 1e-3, 0.1, [2, 3]
    train(compose_config(tiny_run(*TINY, "num_epochs=4", f"lr={lr}", f"lr_gamma={gamma}", "lr_milestones=[2,3]",
                                 "warmup_steps=0", f"output_dir={tmp_path}")))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "lr" in entry]
    assert [(e["step"], e["epoch"]) for e in steps] == [(s, (s + 1) // 2) for s in range(1, 9)]
    for entry in steps:
        passed = sum(1 for m in milestones if entry["epoch"] - 1 >= m)  # epochs counted from 0, as MultiStepLR
        assert entry["lr"] == pytest.approx(lr * gamma ** passed), (
            f"step {entry['step']} (epoch {entry['epoch']}) must log the lr it used, "
            f"lr x gamma^{passed} = {lr * gamma ** passed}, not {entry['lr']}")
