"""The training loop: the shape of an optimiser step (micro-batches, sync, mean gradient, one step), and its
bookkeeping in real tiny runs: the task loss and its label smoothing, the logged lr."""

from __future__ import annotations

import contextlib
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


class StepRecorder:
    """A fake accelerator, optimiser, scheduler and controller that write what the trainer does, in order,
    into one event list (so a test can read an optimiser step's shape)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.events: list = []
        self.sgd = torch.optim.SGD([weight], lr=1.0)

    @contextlib.contextmanager
    def no_sync(self, model):
        self.events.append("no_sync")
        yield
        self.events.append("sync_again")

    def backward(self, loss: torch.Tensor) -> None:
        self.events.append(("backward", round(loss.item(), 6)))
        loss.backward()

    def clip_grad_norm_(self, params, max_norm) -> None:
        self.events.append("clip")

    def reduce(self, tensor, reduction):
        return tensor

    def skip_first_batches(self, loader, count):
        return loader[count:]

    def step(self) -> None:
        self.events.append("step")
        self.sgd.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.events.append("zero_grad")
        self.sgd.zero_grad(set_to_none=set_to_none)


def recording_trainer(accumulation: int, batches: list[dict], batches_done: int = 0):
    """A Trainer holding only what train_epoch and optimizer_step use; its loss is (w·x)² per micro-batch."""
    from types import SimpleNamespace

    weight = torch.tensor([1.0, -2.0], requires_grad=True)
    recorder = StepRecorder(weight)
    run = trainer.Trainer.__new__(trainer.Trainer)
    run.accelerator = run.optimizer = recorder
    run.scheduler = SimpleNamespace(get_last_lr=lambda: [0.5], step=lambda: recorder.events.append("schedule"))
    run.controller = SimpleNamespace(update=lambda reduce: recorder.events.append("controller"))
    run.config = SimpleNamespace(optim=SimpleNamespace(grad_clip=1.0),
                                 logging=SimpleNamespace(save_every=0, log_every=100, debug_nonfinite=False))
    run.wrapped, run.clip_params, run.accumulation, run.total_steps = None, [weight], accumulation, 100
    run.state = trainer.TrainState(batches_done=batches_done)
    run.progress = SimpleNamespace(update=lambda count: None)
    run.epoch_loader = lambda epoch: batches

    def loss(batch):
        value = (weight * batch["x"]).sum() ** 2
        recorder.events.append(("loss", batch["i"], round(value.item(), 6)))
        return value

    run.micro_batch_loss = loss
    return run, recorder, weight


def micro_batches(count: int) -> list[dict]:
    return [{"i": i, "x": torch.tensor([0.5 * i + 1.0, 1.0])} for i in range(count)]


def test_an_optimizer_step_syncs_only_its_last_micro_batch_and_steps_once_on_their_mean_gradient():
    batches = micro_batches(5)  # accumulation 2: steps of 2, 2 and a short last one of 1 micro-batch
    run, recorder, weight = recording_trainer(2, batches)
    start = weight.detach().clone()
    run.train_epoch(1)
    events = recorder.events
    loss0, loss1 = (round(((start * b["x"]).sum() ** 2).item(), 6) for b in batches[:2])
    assert events[:11] == ["no_sync", ("loss", 0, loss0), ("backward", round(loss0 / 2, 6)), "sync_again",
                           ("loss", 1, loss1), ("backward", round(loss1 / 2, 6)),
                           "clip", "step", "zero_grad", "schedule", "controller"]
    assert [e if isinstance(e, str) else e[:2] for e in events if e in ("no_sync", "step") or e[0] == "loss"] == [
        "no_sync", ("loss", 0), ("loss", 1), "step", "no_sync", ("loss", 2), ("loss", 3), "step", ("loss", 4), "step"]
    scaled = [(loss[2], backward[1]) for loss, backward in zip(events, events[1:])
              if loss[0] == "loss" and backward[0] == "backward"]
    assert [round(value / backward, 3) for value, backward in scaled] == [2, 2, 2, 2, 1], \
        "each backward is its loss over the micro-batches of its step (1 in the short last step)"
    assert run.state.step == 3 and run.state.batches_done == 5
    # The first step's update is the mean of its two micro-batches' gradients (SGD, lr 1).
    first = start.clone().requires_grad_(True)
    grads = [torch.autograd.grad((first * b["x"]).sum() ** 2, first)[0] for b in batches[:2]]
    replay, _, replay_weight = recording_trainer(2, batches[:2])
    replay.train_epoch(1)
    torch.testing.assert_close(replay_weight.detach(), start - (grads[0] + grads[1]) / 2)


def test_a_resumed_epoch_continues_with_the_micro_batches_it_had_left():
    run, recorder, _ = recording_trainer(2, micro_batches(5), batches_done=2)
    run.train_epoch(1)
    assert [e[1] for e in recorder.events if e[0] == "loss"] == [2, 3, 4], "micro-batches 0 and 1 were done"
    assert recorder.events.count("step") == 2 and recorder.events.count("no_sync") == 1
