"""The training loop's bookkeeping in real tiny runs: the task loss and its label smoothing, the logged lr."""

from __future__ import annotations

import json

import pytest
import torch

import ldmole.experiment.trainer as trainer
from ldmole.experiment.run_config import OptimConfig, compose_config
from ldmole.experiment.trainer import _epoch_order, _gradient_accumulation, task_loss, train
from tests.helpers import tiny_run_args

# 8 training examples in batches of 4 without accumulation: 2 optimiser steps per epoch.
TINY = tiny_run_args() + ["method=softmax", "train_max_examples=8", "eval_max_examples=4", "batch_size=4",
                          "per_device_batch_size=4", "eval_batch_size=4", "log_every=1", "save_epoch_adapters=[]",
                          "mixed_precision=no"]


def hand_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over targets != -100 of (1 - ε) (-log p_y) + ε mean_c (-log p_c), written out row by row."""
    losses = []
    for row, target in zip(logits.reshape(-1, logits.shape[-1]).double(), targets.flatten().tolist()):
        if target == -100:
            continue
        log_p = row - torch.logsumexp(row, 0)
        losses.append((1 - smoothing) * -log_p[target] + smoothing * -log_p.mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_task_loss_is_label_smoothed_cross_entropy_over_supervised_targets(smoothing):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 7, generator=gen) * 3
    targets = torch.tensor([[4, 1], [2, -100], [-100, -100]])
    got = task_loss(logits.to(torch.bfloat16), targets, smoothing)
    expected = hand_smoothed_cross_entropy(logits.to(torch.bfloat16).float(), targets, smoothing)
    assert got.dtype == torch.float32, f"the task loss must be computed in float32, got {got.dtype}"
    assert got.item() == pytest.approx(expected.item(), rel=1e-5), f"label_smoothing={smoothing}: expected the hand formula"


def test_epoch_order_is_a_seeded_permutation_that_changes_every_epoch():
    first, second = _epoch_order(12, seed=3, epoch=1), _epoch_order(12, seed=3, epoch=2)
    assert sorted(first) == list(range(12)), "every training example must appear once per epoch"
    assert first == _epoch_order(12, seed=3, epoch=1), "the order must be reproducible from (seed, epoch)"
    assert first != second, "each epoch must see the examples in a new order"
    assert first != _epoch_order(12, seed=4, epoch=1), "another seed must give another order"


def test_gradient_accumulation_gives_the_global_batch_and_rejects_a_remainder():
    config = OptimConfig(batch_size=16, per_device_batch_size=4)
    assert _gradient_accumulation(config, num_processes=1) == 4, "16 = 4 per device x 4 micro-batches"
    assert _gradient_accumulation(config, num_processes=2) == 2, "16 = 4 per device x 2 processes x 2 micro-batches"
    with pytest.raises(ValueError, match="batch_size=16 is not a multiple of per_device_batch_size=4 x 3 processes"):
        _gradient_accumulation(config, num_processes=3)


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
        train(compose_config(TINY + ["max_steps=1", f"label_smoothing={smoothing}", f"output_dir={out}"]))
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
    train(compose_config(TINY + ["num_epochs=4", f"lr={lr}", f"lr_gamma={gamma}", "lr_milestones=[2,3]",
                                 "warmup_steps=0", f"output_dir={tmp_path}"]))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "lr" in entry]
    assert [(e["step"], e["epoch"]) for e in steps] == [(s, (s + 1) // 2) for s in range(1, 9)]
    for entry in steps:
        passed = sum(1 for m in milestones if entry["epoch"] - 1 >= m)  # epochs counted from 0, as MultiStepLR
        assert entry["lr"] == pytest.approx(lr * gamma ** passed), (
            f"step {entry['step']} (epoch {entry['epoch']}) must log the lr it used, "
            f"lr x gamma^{passed} = {lr * gamma ** passed}, not {entry['lr']}")
