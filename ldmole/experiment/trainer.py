"""The fine-tuning loop: data -> MoLE model -> AdamW steps with routing losses -> selection -> evaluation.

Read top to bottom: :func:`train` is the whole run; :class:`Trainer` holds what the loop changes,
its methods in the order a run uses them, and :meth:`Trainer.optimizer_step` is one optimiser step on
one screen (micro-batches, backward, clip, step, schedule). ``accelerate`` handles devices, DDP / FSDP,
autocast and the gradient all-reduce; the gradient accumulation is written out here. The data and
models come from :class:`~.run.Run`, as for ldmole-eval, the routing plots and the λ probe.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..core import losses
from ..core.adapter_io import atomic_write, load_mole, read_mole_weights, write_mole_files
from ..core.compile import compile_mole_model
from ..core.injection import mole_parameters
from ..core.records import RoutingRecord, routing_records
from ..core.routers import aux_losses_of
from .adapter_info import AdapterInfo
from .checkpointing import (STATE_NAME, CheckpointError, finalize_checkpoint, latest_checkpoint, load_plain,
                            new_checkpoint_tmp, prune_checkpoints, read_record, rng_state, set_rng_state)
from .data.collation import train_collate
from .data.features import IGNORE_INDEX
from .evaluation import evaluate
from .launch import gradient_accumulation, resolve_launch
from .metrics import METRICS_NAME, RunMetrics
from .pretrained import save_adapter
from .quantization import check_quantization_setup
from .routing_stats import RoutingStats
from .run import RUN_SPLITS, Run
from .run_config import RunConfig
from .run_folder import CONFIG_NAME, LOG_NAME, TRACKER_DIR, RunFolder, RunPlan
from .run_identity import identity, identity_hash
from .selected_logits import SelectedLogits
from .sharding import (clip_parameters, gather_mole_state, is_sharded, load_mole_state, load_optimizer_state,
                       optimizer_state)

__all__ = ["train", "training_model", "Trainer", "TrainState", "LossTerm", "routing_loss_terms", "task_loss", "NonFiniteLossError",
           "routing_scalars", "final_scalars", "read_log"]

LOSS_TERMS = ("task", "lb", "sparsity", "z", "l1")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term, the step and the last good checkpoint."""


def task_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean label-smoothed cross-entropy (in float32) of ``logits [B, K, C]`` against ``targets [B, K]``
    over the targets that are not IGNORE_INDEX: (1 - ε) (-log p_y) + ε mean_c (-log p_c)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


@dataclass(frozen=True)
class LossTerm:
    """A routing loss a run adds to the task loss: its name in the log and ``coef · loss(records)``."""

    name: str
    coef: float
    loss: Callable[[Sequence[RoutingRecord]], torch.Tensor]


def _remole_l1(controller: losses.ReMoLEL1Controller, records: Sequence[RoutingRecord]) -> torch.Tensor:
    """The controller's c·L1; every micro-batch also counts toward the step's measured sparsity."""
    penalty = controller.penalty(records)
    controller.observe(records)
    return penalty


def remole_controller(config: RunConfig) -> Optional[losses.ReMoLEL1Controller]:
    """ReMoLE's adaptive L1 controller when the router takes the L1 term (ReLU), else None. Its target
    sparsity is taken per module from each routing record's own expert count (specs like "2468")."""
    if "l1" in aux_losses_of(config.mole.router):
        return losses.ReMoLEL1Controller(config.mole.top_k, config.losses.remole_initial_coef,
                                         config.losses.remole_rate, config.losses.remole_l1)
    return None


def routing_loss_terms(config: RunConfig, controller: Optional[losses.ReMoLEL1Controller]) -> list[LossTerm]:
    """The routing losses the run's method adds (a zero coefficient leaves its term out)."""
    settings = config.losses
    terms = [LossTerm("lb", settings.lb_coef, partial(losses.load_balance_loss, probs=settings.lb_probs)),
             LossTerm("sparsity", settings.sparsity_coef, partial(losses.sparsity_loss, k=settings.sparsity_k)),
             LossTerm("z", settings.z_coef, losses.router_z_loss)]
    terms = [term for term in terms if term.coef]
    if controller is not None:
        terms.append(LossTerm("l1", 1.0, partial(_remole_l1, controller)))  # the controller owns its coefficient
    return terms


def _lr_factor(step: int, steps_per_epoch: int, warmup: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up, then ×gamma at every epoch milestone (MultiStepLR per epoch, as the reference)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    return warm * gamma ** sum(1 for m in milestones if epoch >= m)


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The training order of ``epoch``: a permutation seeded by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


def read_log(path: Path) -> list[tuple[str, dict]]:
    """(line, parsed entry) of every line of a ``log.jsonl``. A torn last line (a crash while it was
    written) is dropped with a warning naming the file; an unparsable line before the last is an error.

    Raises:
        ValueError: a line other than the last is not JSON (naming the file and the line).
    """
    lines = path.read_text().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append((line, json.loads(line)))
        except ValueError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON ({error}); the log is damaged: fix or remove "
                                 "that line, or start again with overwrite=true") from None
            warnings.warn(f"{path}: dropped its unparsable last line (torn by a crash): {line[:80]!r}", stacklevel=2)
    return entries


def _record_nonfinite_modules(model: nn.Module) -> list[str]:
    """Forward hooks (debug only: they sync) recording modules whose output is not finite, in order."""
    seen: list[str] = []

    def hook(name):
        def check(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                seen.append(name)
        return check

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(hook(name))
    return seen


def routing_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """A routing summary (``RoutingStats.summary()``) as tracker scalars: overall and per-layer average
    active experts, the zero-activation rate and, for routers with λ, λ's mean and q05/q50/q95."""
    if not summary:
        return {}
    scalars = {"routing/avg_active_experts": summary["avg_active_experts"],
               "routing/zero_activation_rate": summary["zero_activation_rate"]}
    for layer, stats in summary.get("per_layer", {}).items():
        scalars[f"routing/layer_{int(layer):02d}/active_experts"] = stats["avg_active_experts"]
    lam = summary.get("lambda")
    if lam:
        scalars["routing/lambda_mean"] = lam["mean"]
        for name in ("q05", "q50", "q95"):
            if name in lam["quantiles"]:
                scalars[f"routing/lambda_{name}"] = lam["quantiles"][name]
    return {tag: float(value) for tag, value in scalars.items()}


def final_scalars(metrics: RunMetrics) -> dict[str, float]:
    """The final evaluation as tracker scalars: accuracy, the best selection accuracy and the task's
    own metrics (MCC, F1, per-category accuracy) where the task has them."""
    scalars = {"final/accuracy": metrics.accuracy}
    for name in ("best_selection_accuracy", "mcc", "f1"):
        if getattr(metrics, name) is not None:
            scalars[f"final/{name}"] = getattr(metrics, name)
    for category, stats in (metrics.per_category or {}).items():
        # MMLU-Pro categories have spaces; tracker tags are safer without them
        scalars[f"final/category/{re.sub(r'[^A-Za-z0-9_.-]+', '_', category)}/accuracy"] = stats["accuracy"]
    return {tag: float(value) for tag, value in scalars.items()}


def broadcast_object(accelerator, value):
    """``value`` from the main process on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def make_accelerator(config: RunConfig):
    """An ``Accelerator`` for the run, CPU (gloo) without CUDA, and the run's config with what the launch
    decides filled in (:func:`ldmole.experiment.launch.resolve_launch`: a null ``mixed_precision`` is the
    launcher's, a null ``per_device_batch_size`` follows the process count). Gradient accumulation is the
    trainer's own (:meth:`Trainer.optimizer_step`), so accelerate's stays at 1: it neither divides losses nor
    skips steps.

    Returns:
        (accelerator, the resolved config).
    Raises:
        ValueError: a batch that does not split over the processes; DeepSpeed with more than one micro-batch
            per step (its engine steps on every backward unless accelerate drives the accumulation; naming the
            batch sizes that avoid it).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state()  # a second train() in one process may use another mixed precision
    report_to = None if config.logging.report_to == "none" else config.logging.report_to
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.optim.mixed_precision,
                              log_with=report_to, project_dir=str(config.output_dir))
    config = resolve_launch(config, accelerator.num_processes, str(accelerator.mixed_precision),
                            accelerator.device.type)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            gradient_accumulation(config.optim, accelerator.num_processes) > 1:
        raise ValueError(f"DeepSpeed needs one micro-batch per optimiser step: set batch_size = per_device_batch_size "
                         f"x {accelerator.num_processes} processes (now batch_size={config.optim.batch_size}, "
                         f"per_device_batch_size={config.optim.per_device_batch_size}), or use FSDP")
    return accelerator, config


@dataclass
class TrainState:
    """Where a run is (what a checkpoint carries besides weights, optimiser, scheduler and RNG)."""

    step: int = 0
    epoch: int = 1
    batches_done: int = 0  # micro-batches of ``epoch`` consumed on this process
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, step, selection_accuracy
    best_accuracy: float = -1.0
    best_epoch: Optional[int] = None
    best_state: Optional[dict[str, torch.Tensor]] = None  # MoLE weights (CPU) of the best epoch; sharded: main only

    def state_dict(self) -> dict[str, Any]:
        """Plain values for ``torch.save``."""
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "history": list(self.history), "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        for name, value in state.items():
            setattr(self, name, value)


def training_model(config: RunConfig, run: Run) -> nn.Module:
    """The model a run trains: ``run.mole_model()`` with gradient checkpointing and ``torch.compile`` as the
    config asks (``ldmole-bench-step`` builds its trainer path with this too)."""
    base = run.mole_model()
    if config.optim.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.optim.compile:
        base.config.use_cache = False  # a KV cache would give every decoder layer a graph of its own
        compile_mole_model(base)
    return base


def train(config: RunConfig) -> RunMetrics:
    """Runs one fine-tuning run described by a composed config; returns (and writes) its metrics.

    Raises:
        ValueError / FileNotFoundError: bad settings or data (before the model loads where possible).
        NonFiniteLossError: a loss term went NaN/inf (every process raises; checkpoints stay good).
    """
    started = time.time()
    controller = remole_controller(config)  # built before the model loads: bad remole_* settings fail early
    accelerator, config = make_accelerator(config)
    check_quantization_setup(config.backbone.quantization, accelerator.distributed_type)  # before anything loads
    folder = RunFolder(config.output_dir)
    try:
        plan = None
        if accelerator.is_main_process:  # one writer per folder; what it may do is decided before anything loads
            folder.acquire()
            plan = folder.plan(config)
        plan = broadcast_object(accelerator, plan)
        run = Run(config)
        for split in RUN_SPLITS:  # read and checked before the model loads
            run.examples(split)
        base = training_model(config, run)
        trainer = Trainer(config, accelerator, run, base, routing_loss_terms(config, controller), controller)
        trainer.resume_or_start(folder, plan)
        trainer.fit()
        return trainer.finish(time.time() - started, plan.resume_from)
    finally:
        folder.release()


class Trainer:
    """The model, optimiser, loaders and :class:`TrainState` of one run, and the loop over them."""

    def __init__(self, config: RunConfig, accelerator, run: Run, base: nn.Module, terms: list[LossTerm],
                 controller: Optional[losses.ReMoLEL1Controller]) -> None:
        self.config, self.accelerator, self.run, self.base = config, accelerator, run, base
        self.terms, self.controller = terms, controller
        self.main = accelerator.is_main_process
        self.tracking = config.logging.report_to != "none"  # tensorboard / wandb through accelerate
        self.output_dir = Path(config.output_dir)
        self.log_path = self.output_dir / LOG_NAME
        optim = config.optim
        self.train_features = run.features(run.examples("train"))
        loaders = [run.loader(split) for split in ("selection", "evaluation")]
        wrapped = SelectedLogits(base)
        wrapped.train()
        self.trainable = list(mole_parameters(base).values())
        # Full shapes, recorded before FSDP / ZeRO-3 split the parameters: a resumed adapter is checked against them.
        self.mole_shapes = {name: param.shape for name, param in mole_parameters(base).items()}
        optimizer = torch.optim.AdamW(self.trainable, lr=optim.lr, weight_decay=optim.weight_decay)
        self.wrapped, self.optimizer, self.selection_loader, self.eval_loader = accelerator.prepare(
            wrapped, optimizer, *loaders)
        self.sharded = is_sharded(accelerator)
        self.clip_params = clip_parameters(accelerator, self.wrapped, self.trainable)
        self.accumulation = gradient_accumulation(optim, accelerator.num_processes)  # micro-batches per step
        micro_batches = math.ceil(len(self.train_features) / (optim.per_device_batch_size * accelerator.num_processes))
        self.steps_per_epoch = math.ceil(micro_batches / self.accumulation)
        self.total_steps = self.steps_per_epoch * optim.num_epochs
        if optim.max_steps:
            self.total_steps = min(self.total_steps, optim.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            _lr_factor, steps_per_epoch=self.steps_per_epoch, warmup=optim.warmup_steps,
            milestones=list(optim.lr_milestones), gamma=optim.lr_gamma))
        self.state = TrainState()
        # Non-finite detection: device-side first-bad-step flags, read only at log/checkpoint/epoch points.
        self.first_bad = torch.full((len(LOSS_TERMS),), -1, dtype=torch.long, device=accelerator.device)
        self.bad_modules = _record_nonfinite_modules(base) if config.logging.debug_nonfinite else []
        self.running: dict[str, torch.Tensor] = {}
        self.running_micro = 0  # micro-batches summed into `running` since the last log line
        self.step_lr = optim.lr  # the lr the last optimiser step used (what a log line reports)
        self.progress = None     # the tqdm bar, open while fit() runs
        self.base_revision = getattr(getattr(base, "config", None), "_commit_hash", None)  # hub commit, when known

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The training batches of ``epoch`` in its seeded order (own generator: see ``Run.loader``)."""
        seed, run = self.config.seed, self.run
        ordered = [self.train_features[i] for i in _epoch_order(len(self.train_features), seed, epoch)]
        return self.accelerator.prepare_data_loader(DataLoader(
            ordered, batch_size=self.config.optim.per_device_batch_size,
            collate_fn=partial(train_collate, pad_token_id=run.pad_token_id, task_kind=run.task.task_kind),
            generator=torch.Generator().manual_seed(seed + epoch)))

    def resume_or_start(self, folder: RunFolder, plan: RunPlan) -> None:
        """Clears what the folder's plan clears (the main process), restores the checkpoint it resumes
        from, marks the folder as running and writes config.yaml."""
        if self.main:
            if plan.note:
                warnings.warn(plan.note, stacklevel=2)
            folder.clear(plan)
        self.accelerator.wait_for_everyone()
        if plan.resume_from is not None:
            self.load_checkpoint(plan.resume_from)
        if self.main:
            folder.mark_running(self.config.to_flat())
            text = yaml.safe_dump(self.config.to_flat(), sort_keys=False)
            atomic_write(self.output_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        if self.tracking:
            self.accelerator.init_trackers(TRACKER_DIR, config={k: str(v) for k, v in self.config.to_flat().items()})

    def load_checkpoint(self, directory: Path) -> None:
        """Adapter, optimiser, scheduler, controller, train state and this process's RNG from ``directory``
        (whose identity the run folder's plan has checked)."""
        accelerator = self.accelerator
        saved = load_plain(directory / STATE_NAME)
        revision = read_record(directory).get("base_model_revision")
        if revision and self.base_revision and revision != self.base_revision:
            raise CheckpointError(f"resume: {directory} was trained on {self.config.backbone.model_source} at revision "
                                  f"{revision}, but the base model loaded now is at {self.base_revision}; load the "
                                  "same revision or start again with overwrite=true")
        if saved["num_processes"] != accelerator.num_processes:
            raise ValueError(f"resume: {directory} was written by {saved['num_processes']} processes but this run "
                             f"has {accelerator.num_processes}; resume with the same number of processes")
        if self.sharded:  # every process takes its slice of the full weights the main process reads
            weights = read_mole_weights(directory, self.mole_shapes) if self.main else None
            load_mole_state(accelerator, self.wrapped, self.base, weights)
        else:
            load_mole(self.base, directory)
        load_optimizer_state(accelerator, self.wrapped, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.controller is not None:
            self.controller.load_state_dict(saved["controller"])
        self.state.load_state_dict(saved["progress"])
        set_rng_state(load_plain(directory / f"rng_rank{accelerator.process_index}.pt"))
        if self.main and self.log_path.exists():  # drop log lines written after the checkpoint
            kept = [line for line, entry in read_log(self.log_path) if entry.get("step", 0) <= self.state.step]
            atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def save_checkpoint(self) -> None:
        """Writes ``checkpoints/step-N`` atomically (after checking that no loss went non-finite)."""
        self.check_finite()
        accelerator, step = self.accelerator, self.state.step
        tmp = new_checkpoint_tmp(self.output_dir, step) if self.main else None
        tmp = Path(broadcast_object(accelerator, str(tmp) if tmp else None))
        torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
        # Collective under FSDP / ZeRO-3 (every process gathers, the main one writes).
        weights = gather_mole_state(accelerator, self.wrapped, self.base)
        optimizer = optimizer_state(accelerator, self.wrapped, self.optimizer)
        if self.main:
            write_mole_files(self.base, tmp, state_dict=weights)
            torch.save({"progress": self.state.state_dict(), "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(),
                        "controller": self.controller.state_dict() if self.controller is not None else None,
                        "num_processes": accelerator.num_processes}, tmp / STATE_NAME)
        accelerator.wait_for_everyone()
        if self.main:
            run = identity(self.config.to_flat())
            finalize_checkpoint(tmp, step, {"identity": run, "identity_hash": identity_hash(run),
                                            "base_model_revision": self.base_revision})
            prune_checkpoints(self.output_dir, self.config.logging.keep_checkpoints)
        accelerator.wait_for_everyone()

    def check_finite(self) -> None:
        """Raises :class:`NonFiniteLossError` when a loss term went NaN/inf on any process (a host sync)."""
        flags = self.accelerator.reduce(self.first_bad, "max").tolist()
        bad = {name: s for name, s in zip(LOSS_TERMS, flags) if s >= 0}
        if not bad:
            return
        first = min(bad.values())
        latest = latest_checkpoint(self.output_dir)
        message = (f"non-finite loss at step {first}: component(s) {sorted(n for n, s in bad.items() if s == first)} "
                   f"became NaN/inf; last good checkpoint: {latest or 'none'} (resume=auto restarts from it). "
                   "Lower lr, enable grad clipping, or rerun with debug_nonfinite=true to find the first bad module")
        if self.bad_modules:
            message += f"; first module with a non-finite output: {self.bad_modules[0]}"
        raise NonFiniteLossError(message)

    def fit(self) -> None:
        """Epochs until ``num_epochs`` or ``total_steps``; each ends with selection and bookkeeping."""
        from tqdm.auto import tqdm

        config, state = self.config, self.state
        self.progress = tqdm(total=self.total_steps, initial=state.step, disable=not self.main,
                             desc=f"{config.method} {config.task}")
        while state.epoch <= config.optim.num_epochs and state.step < self.total_steps:
            self.train_epoch(state.epoch)
            self.end_epoch(state.epoch)
        self.progress.close()

    def train_epoch(self, epoch: int) -> None:
        """The optimiser steps of ``epoch`` from where the state says it is (mid-epoch after a resume)."""
        state, save_every = self.state, self.config.logging.save_every
        loader = self.epoch_loader(epoch)
        micro_per_epoch = len(loader)  # per process
        if state.batches_done:
            loader = self.accelerator.skip_first_batches(loader, state.batches_done)
        batches = iter(loader)
        while state.batches_done < micro_per_epoch and state.step < self.total_steps:
            # `accumulation` micro-batches per step; the last step of an epoch may get fewer.
            count = min(self.accumulation, micro_per_epoch - state.batches_done)
            self.optimizer_step(islice(batches, count), count)
            state.batches_done += count
            state.step += 1
            self.progress.update(1)
            if self.config.logging.debug_nonfinite:
                self.check_finite()
            if state.step % self.config.logging.log_every == 0 or state.step == self.total_steps:
                self.log_step(epoch)
            # The epoch's last step is saved once, by end_epoch, with the epoch's selection result.
            if save_every and state.step % save_every == 0 and state.step < self.total_steps and \
                    state.batches_done < micro_per_epoch:
                self.save_checkpoint()

    def optimizer_step(self, micro_batches: Iterable[dict], count: int) -> None:
        """One optimiser step over ``count`` micro-batches: each one's loss backward, scaled by 1/count so
        that the gradient is their mean, with the gradient all-reduce only after the last; then clip, step,
        zero the gradients, advance the lr schedule and ReMoLE's L1 controller."""
        accelerator, model = self.accelerator, self.wrapped
        for index, batch in enumerate(micro_batches):
            with nullcontext() if index == count - 1 else accelerator.no_sync(model):
                accelerator.backward(self.micro_batch_loss(batch) / count)
        accelerator.clip_grad_norm_(self.clip_params, self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the lr this optimiser step used (logged)
        self.scheduler.step()
        if self.controller is not None:
            self.controller.update(reduce=lambda gap: accelerator.reduce(gap, "mean"))

    def micro_batch_loss(self, batch: dict) -> torch.Tensor:
        """The summed loss terms of one micro-batch (forward, task loss, routing losses); each term is
        added to the running sums that the next log line averages, and a non-finite one flagged."""
        logits = self.wrapped(batch["input_ids"], batch["attention_mask"], batch["positions"])
        records = routing_records(self.base)
        values = {"task": task_loss(logits, batch["targets"], self.config.optim.label_smoothing)}
        for term in self.terms:
            values[term.name] = term.coef * term.loss(records)
        for i, name in enumerate(LOSS_TERMS):
            if name in values:
                nonfinite = ~torch.isfinite(values[name].detach())
                self.first_bad[i] = torch.where(nonfinite & (self.first_bad[i] < 0), self.state.step + 1,
                                                self.first_bad[i])
        for name, value in values.items():
            self.running[name] = self.running.get(name, 0.0) + value.detach()
        self.running_micro += 1
        return sum(values.values())

    def log_step(self, epoch: int) -> None:
        """One log.jsonl line: the step's lr and each loss term's mean since the previous line."""
        self.check_finite()
        accelerator = self.accelerator
        entry = {"step": self.state.step, "epoch": epoch, "lr": self.step_lr}
        entry.update({k: float(accelerator.reduce(v, "mean")) / self.running_micro for k, v in self.running.items()})
        if self.controller is not None:
            entry["l1_coef"] = float(self.controller.coefficient)
        self.running, self.running_micro = {}, 0
        self.progress.set_postfix(loss=f"{sum(v for k, v in entry.items() if k in LOSS_TERMS):.4f}")
        if self.main:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if self.tracking:
            accelerator.log(entry, step=self.state.step)

    def end_epoch(self, epoch: int) -> None:
        """Selection accuracy, the best epoch's parameters, epoch adapters, and a checkpoint."""
        self.check_finite()
        state, accelerator = self.state, self.accelerator
        selection = evaluate(self.eval_model(), self.selection_loader, self.run.task, self.run.examples("selection"),
                             autocast=accelerator.autocast, gather=accelerator.gather_for_metrics)
        state.history.append({"epoch": epoch, "step": state.step, "selection_accuracy": selection["accuracy"]})
        if self.main:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps({"epoch_end": epoch, "step": state.step, "selection": selection}) + "\n")
        if self.tracking:
            accelerator.log({"selection/accuracy": float(selection["accuracy"])}, step=state.step)
        improved = selection["accuracy"] > state.best_accuracy  # the same on every process (gathered metrics)
        keep_adapter = epoch in self.config.logging.save_epoch_adapters
        # Collective under FSDP / ZeRO-3, so every process gathers; there only the main one gets the weights.
        weights = gather_mole_state(accelerator, self.wrapped, self.base) if improved or keep_adapter else None
        if improved:
            state.best_accuracy, state.best_epoch = selection["accuracy"], epoch
            state.best_state = {k: v.clone() for k, v in weights.items()} if weights is not None else None
        if self.main and keep_adapter:
            self.save_adapter(self.output_dir / f"adapter_epoch{epoch}", weights=weights)
        state.epoch, state.batches_done = epoch + 1, 0
        if self.config.logging.save_every and state.step < self.total_steps:
            self.save_checkpoint()

    def eval_model(self) -> nn.Module:
        """The model that evaluation calls: the unwrapped one, except when sharded, where only the
        prepared model's forward gathers the parameter slices."""
        return self.wrapped if self.sharded else self.accelerator.unwrap_model(self.wrapped)

    def save_adapter(self, directory: Path, metrics: Optional[RunMetrics] = None,
                     weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The adapter with its base-model record and model card (``ldmole.from_pretrained`` loads it);
        ``weights``: the full MoLE weights (from :func:`gather_mole_state`) to write."""
        info = AdapterInfo.from_run(self.config, self.run.task, self.base)
        save_adapter(self.base, directory, info, metrics.to_dict() if metrics is not None else None, state_dict=weights,
                     tokenizer=self.run.tokenizer)

    def finish(self, elapsed_s: float, resumed_from: Optional[Path]) -> RunMetrics:
        """Loads the best epoch, scores the evaluation split with routing statistics, writes the outputs."""
        config, state, accelerator = self.config, self.state, self.accelerator
        load_mole_state(accelerator, self.wrapped, self.base, state.best_state)
        stats = RoutingStats()
        run = self.run
        final = evaluate(self.eval_model(), self.eval_loader, run.task, run.examples("evaluation"),
                         autocast=accelerator.autocast, gather=accelerator.gather_for_metrics,
                         observe=lambda batch: stats.update(routing_records(self.base)))
        metrics = RunMetrics(
            **{k: v for k, v in final.items() if k != "num_examples"},
            num_eval_examples=final["num_examples"], num_train_examples=len(run.examples("train")),
            eval_split="validation" if config.data.protocol == "reference" else run.task.eval_split,
            protocol=config.data.protocol, best_epoch=state.best_epoch, best_selection_accuracy=state.best_accuracy,
            history=state.history, steps=state.step, skipped_rows=run.task_data().skipped,
            routing=stats.summary(reduce=lambda t: accelerator.reduce(t, "sum")),
            model=config.model, task=config.task, method=config.method, seed=config.seed,
            resumed_from=str(resumed_from) if resumed_from else None, wall_time_s=round(elapsed_s, 1),
            num_processes=accelerator.num_processes)
        if self.main:
            self.save_adapter(self.output_dir / "adapter", metrics, weights=state.best_state)
            atomic_write(self.output_dir / METRICS_NAME, lambda tmp: Path(tmp).write_text(metrics.to_json()))
        if self.tracking:
            accelerator.log({**final_scalars(metrics), **routing_scalars(metrics.routing)}, step=state.step)
            accelerator.end_training()
        accelerator.wait_for_everyone()
        return metrics
