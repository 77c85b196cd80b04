"""The training loop: the shape of an optimiser step (micro-batches, sync, mean gradient, one step), and its
bookkeeping in real tiny runs: the task loss and its label smoothing, the logged lr."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ldmole.experiment.trainer as trainer
from ldmole.experiment.run_config import OptimConfig
from ldmole.experiment.launch import gradient_accumulation as _gradient_accumulation
from ldmole.experiment.trainer import _epoch_order, task_loss

# 8 training examples in batches of 4 without accumulation: 2 optimiser steps per epoch.


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


def test_batch_16_in_one_step_and_4_accumulated_micro_batches_of_4_give_the_same_gradients():
    """The trainer's micro-batch loss (forward through SelectedLogits, task loss and the sparsity term),
    once on 16 rows and as 4 micro-batches of 4 each scaled by 1/4 as ``optimizer_step`` scales them:
    the same adapter gradients to float32 round-off (dropout 0; the load-balance loss is off, being
    per micro-batch and not additive)."""
    from types import SimpleNamespace

    from ldmole import MoLEConfig, get_mole_model, mole_parameters
    from ldmole.core import losses
    from ldmole.experiment.selected_logits import SelectedLogits
    from ldmole.experiment.trainer import LOSS_TERMS, LossTerm, Trainer
    from tests.helpers import tiny_model

    base = get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="sparsegen", num_experts=4, r=2,
                                                                         dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():  # move lora_B off zero so every adapter tensor gets a gradient
        for param in mole_parameters(base).values():
            param.add_(torch.randn_like(param) * 0.05)
    base.train()
    state = SimpleNamespace(wrapped=SelectedLogits(base), base=base, terms=[
        LossTerm("sparsity", 0.5, lambda records: losses.sparsity_loss(records, 1))],
        config=SimpleNamespace(optim=SimpleNamespace(label_smoothing=0.1)), state=SimpleNamespace(step=0),
        first_bad=torch.full((len(LOSS_TERMS),), -1, dtype=torch.long), running={}, running_micro=0)
    ids = torch.randint(1, 96, (16, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "positions": torch.full((16, 1), 7),
             "targets": torch.randint(0, 96, (16, 1))}
    params = [p for p in base.parameters() if p.requires_grad]

    def gradients(micro_batches: int) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for chunk in range(micro_batches):
            rows = slice(chunk * 16 // micro_batches, (chunk + 1) * 16 // micro_batches)
            (Trainer.micro_batch_loss(state, {k: v[rows] for k, v in batch.items()}) / micro_batches).backward()
        return [p.grad.clone() for p in params]

    whole, accumulated = gradients(1), gradients(4)
    assert state.running["sparsity"] > 0, "the sparsity term must take part"
    assert all(g.abs().sum() > 0 for g in whole), "every adapter tensor gets a gradient"
    for name, a, b in zip([n for n, p in base.named_parameters() if p.requires_grad], whole, accumulated, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
