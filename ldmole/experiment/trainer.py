"""The fine-tuning loop: data -> MoLE model -> AdamW steps with routing losses -> selection -> evaluation.

Read top to bottom: ``train(config)`` is the whole run. ``accelerate`` handles devices, DDP,
autocast and gradient accumulation; everything else is plain PyTorch.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..core import losses
from ..core.adapter_io import atomic_write, load_mole, save_mole
from .routing_stats import RoutingStats
from .checkpointing import (latest_checkpoint, new_checkpoint_tmp, prune_checkpoints, rng_state, set_rng_state,
                            write_checkpoint)
from .data import collate, encode_classification, encode_qa, get_chat_format, load_task, pad_token_id_for
from .data.features import IGNORE_INDEX
from .evaluation import classification_metrics, option_scores, qa_metrics
from ..core.injection import get_mole_model, mole_parameters
from .models import language_model_parts, load_base_model, load_tokenizer, resolve_model_source
from ..core.records import routing_records
from ..core.routers import aux_losses_of
from .run_config import mole_config_from

__all__ = ["train", "SelectedLogits", "answer_positions", "task_loss", "NonFiniteLossError"]


class SelectedLogits(nn.Module):
    """Runs the decoder body and applies the head only at chosen positions (never the full vocab
    logits of every position). ``positions [B, K]`` -> logits ``[B, K, out]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.body, self.head = language_model_parts(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.head(picked)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, K], targets [B, K]) of the supervised tokens: position t predicts labels[t+1].

    Computed on the host from the collated CPU labels; rows with fewer than K targets are padded
    with position 0 and target IGNORE_INDEX.
    """
    shifted = labels[:, 1:]
    supervised = shifted != IGNORE_INDEX
    width = max(int(supervised.sum(1).max()), 1)
    positions = torch.zeros(labels.shape[0], width, dtype=torch.long)
    targets = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=torch.long)
    for row in range(labels.shape[0]):
        index = supervised[row].nonzero().flatten()
        positions[row, : len(index)] = index
        targets[row, : len(index)] = shifted[row, index]
    return positions, targets


def task_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean label-smoothed cross-entropy (in float32) of ``logits [B, K, C]`` against ``targets [B, K]``
    over the targets that are not IGNORE_INDEX: (1 - ε) (-log p_y) + ε mean_c (-log p_c)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def _encode_all(examples, kind: str, tokenizer, chat_format, max_length: int, truncate: bool) -> list[dict]:
    """Token features of every example, each tagged with its index (to map gathered predictions back)."""
    encode = encode_qa if kind == "qa" else encode_classification
    features = []
    for index, example in enumerate(examples):
        item = encode(example, tokenizer, chat_format, max_length, truncate=truncate)
        item["example_index"] = index
        features.append(item)
    return features


def _collate_with_index(batch: list[dict], pad_token_id: int, kind: str) -> dict:
    """A padded batch plus the positions whose logits the loss needs and their targets (tensors only)."""
    out = collate(batch, pad_token_id)
    out["example_index"] = torch.tensor([item["example_index"] for item in batch], dtype=torch.long)
    if kind == "qa":
        out["positions"], out["targets"] = answer_positions(out["labels"])
    else:
        out["positions"] = out["last_token_index"].unsqueeze(1)
        out["targets"] = out["label"].unsqueeze(1)
    for key in ("uid", "category", "labels", "sequence_lengths"):
        out.pop(key, None)
    return out


def _lr_factor(step: int, steps_per_epoch: int, warmup: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up, then ×gamma at every epoch milestone (MultiStepLR per epoch, as the reference)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    epoch = step // max(steps_per_epoch, 1)
    return warm * gamma ** sum(1 for m in milestones if epoch >= m)


def _gradient_accumulation(config: dict, num_processes: int) -> int:
    """Micro-batches per optimiser step so that the global batch is ``batch_size``."""
    per_step = int(config["per_device_batch_size"]) * num_processes
    if int(config["batch_size"]) % per_step:
        raise ValueError(
            f"batch_size={config['batch_size']} is not a multiple of per_device_batch_size="
            f"{config['per_device_batch_size']} x {num_processes} processes; change either key"
        )
    return int(config["batch_size"]) // per_step


@torch.no_grad()
def evaluate(accelerator, wrapped: nn.Module, loader: DataLoader, kind: str, task: str, examples,
             stats: Optional[RoutingStats] = None) -> dict:
    """Accuracy (and task metrics) of ``wrapped`` on ``loader``; optionally routing statistics."""
    model = accelerator.unwrap_model(wrapped)
    was_training = model.training
    model.eval()
    predictions, golds, indices = [], [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])[:, 0].float()
        if stats is not None:
            stats.update(routing_records(model.model))
        if kind == "qa":
            scores = option_scores(logits, batch["option_token_ids"], batch["option_mask"])
            gold = batch["answer"]
        else:
            scores, gold = logits, batch["label"]
        pred, gold, index = accelerator.gather_for_metrics((scores.argmax(-1), gold, batch["example_index"]))
        predictions.append(pred.cpu())
        golds.append(gold.cpu())
        indices.append(index.cpu())
    model.train(was_training)
    pred = torch.cat(predictions).numpy()
    gold = torch.cat(golds).numpy()
    index = torch.cat(indices).numpy()
    if kind == "qa":
        metrics = qa_metrics(pred, gold, [examples[i].category for i in index])
    else:
        metrics = classification_metrics(pred, gold, task)
    metrics["num_examples"] = int(len(pred))
    return metrics


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term, the step and the last good checkpoint."""


LOSS_TERMS = ("task", "lb", "sparsity", "z", "l1")


def _epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The training order of ``epoch``: a permutation seeded by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


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


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Runs one fine-tuning run described by a composed config; returns (and writes) its metrics.

    Raises:
        ValueError / FileNotFoundError: bad settings or data (before the model loads where possible).
        NonFiniteLossError: a loss term went NaN/inf (every process raises; checkpoints stay good).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    started = time.time()
    mole_config = mole_config_from(config)
    # Built before the model loads so that bad remole_* settings fail early; its target sparsity is
    # taken per module from each routing record's own expert count (per-layer specs such as "2468").
    controller = None
    if "l1" in aux_losses_of(mole_config.router):
        controller = losses.ReMoLEL1Controller(mole_config.top_k, float(config["remole_initial_coef"]),
                                               float(config["remole_rate"]), str(config["remole_l1"]))
    # Without CUDA the processes of a torchrun / accelerate launch job talk over gloo on the CPU.
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    AcceleratorState._reset_state()  # a second train() in one process may use another mixed precision
    accumulation = _gradient_accumulation(config, state.num_processes)
    report_to = None if config.get("report_to") in (None, "none") else config["report_to"]
    output_dir = Path(config["output_dir"])
    seed = int(config["seed"])
    accelerator = Accelerator(cpu=cpu, mixed_precision=str(config["mixed_precision"]),
                              gradient_accumulation_steps=accumulation, log_with=report_to, project_dir=str(output_dir))
    set_seed(seed)
    main = accelerator.is_main_process

    # ---- data
    task = load_task(config["task_name"], config.get("data_dir"), protocol=config["protocol"],
                     selection_size=config.get("selection_size"), seed=seed,
                     skip_bad_rows=bool(config["skip_bad_rows"]))
    kind = task.spec.kind
    tokenizer = load_tokenizer(str(config.get("tokenizer") or resolve_model_source(str(config["model_source"]))))
    chat_format = get_chat_format(config["chat_format"])
    max_length = int(config.get("max_length") or task.spec.max_length)
    train_examples = list(task.train)
    if config.get("train_max_examples"):
        order = np.random.default_rng(seed).permutation(len(train_examples))
        train_examples = [train_examples[i] for i in order[: int(config["train_max_examples"])]]
    limit = config.get("eval_max_examples")
    selection_examples = task.selection[: int(limit)] if limit else task.selection
    eval_examples = task.evaluation[: int(limit)] if limit else task.evaluation
    for name, examples in (("train", train_examples), ("selection", selection_examples), ("evaluation", eval_examples)):
        if not examples:
            raise ValueError(f"task {config['task']!r}: the {name} split is empty; check the files under "
                             f"data_dir={config.get('data_dir')!r} (or lower eval_max_examples / train_max_examples)")
    encode = partial(_encode_all, kind=kind, tokenizer=tokenizer, chat_format=chat_format, max_length=max_length,
                     truncate=bool(config["truncate_long"]))
    pad_id = pad_token_id_for(tokenizer)
    collate_fn = partial(_collate_with_index, pad_token_id=pad_id, kind=kind)
    train_features = encode(train_examples)
    eval_collate = partial(_eval_collate, collate_fn=collate_fn, kind=kind)
    # Loaders get their own generators: creating an iterator must not draw from the global RNG that
    # dropout uses, or a resumed run would see other dropout masks than an uninterrupted one.
    selection_loader = DataLoader(encode(selection_examples), batch_size=int(config["eval_batch_size"]),
                                  collate_fn=eval_collate, generator=torch.Generator().manual_seed(seed))
    eval_loader = DataLoader(encode(eval_examples), batch_size=int(config["eval_batch_size"]), collate_fn=eval_collate,
                             generator=torch.Generator().manual_seed(seed))

    def epoch_loader(epoch: int) -> DataLoader:
        ordered = [train_features[i] for i in _epoch_order(len(train_features), seed, epoch)]
        return accelerator.prepare_data_loader(DataLoader(ordered, batch_size=int(config["per_device_batch_size"]),
                                                          collate_fn=collate_fn,
                                                          generator=torch.Generator().manual_seed(seed + epoch)))

    # ---- model
    base = load_base_model(config, "causal_lm" if kind == "qa" else "classification", tokenizer,
                           num_labels=task.spec.num_labels or 2)
    get_mole_model(base, mole_config)
    if config["gradient_checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = SelectedLogits(base)
    wrapped.train()
    trainable = list(mole_parameters(base).values())
    optimizer = torch.optim.AdamW(trainable, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    wrapped, optimizer, selection_loader, eval_loader = accelerator.prepare(wrapped, optimizer, selection_loader, eval_loader)
    steps_per_epoch = math.ceil(math.ceil(len(train_features) / (int(config["per_device_batch_size"]) * accelerator.num_processes)) / accumulation)
    total_steps = steps_per_epoch * int(config["num_epochs"])
    if config.get("max_steps"):
        total_steps = min(total_steps, int(config["max_steps"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        _lr_factor, steps_per_epoch=steps_per_epoch, warmup=int(config["warmup_steps"]),
        milestones=list(config["lr_milestones"]), gamma=float(config["lr_gamma"])))
    log_path = output_dir / "log.jsonl"

    # ---- state that a checkpoint carries
    progress_state = {"step": 0, "epoch": 1, "batches_done": 0, "history": [],
                      "best": {"accuracy": -1.0, "epoch": None, "state": None}}

    def save_checkpoint() -> None:
        check_finite()
        tmp = new_checkpoint_tmp(output_dir, progress_state["step"]) if main else None
        tmp = Path(broadcast_object(accelerator, str(tmp) if tmp else None))
        torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
        if main:
            save_mole(base, tmp)
            torch.save({"progress": progress_state, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "controller": controller.state_dict() if controller is not None else None,
                        "num_processes": accelerator.num_processes}, tmp / "trainer_state.pt")
        accelerator.wait_for_everyone()
        if main:
            write_checkpoint(tmp, progress_state["step"])
            prune_checkpoints(output_dir, int(config["keep_checkpoints"]))
        accelerator.wait_for_everyone()

    resume_from = None
    if config.get("resume") == "auto":
        resume_from = latest_checkpoint(output_dir)
    elif config.get("resume"):
        resume_from = Path(config["resume"])
        if not (resume_from / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"resume={config['resume']!r}: no trainer_state.pt there; pass a "
                                    f"{output_dir / 'checkpoints'}/step-N directory or resume=auto")
    if resume_from is not None:
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        if saved["num_processes"] != accelerator.num_processes:
            raise ValueError(f"resume: {resume_from} was written by {saved['num_processes']} processes but this run "
                             f"has {accelerator.num_processes}; resume with the same number of processes")
        load_mole(base, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if controller is not None:
            controller.load_state_dict(saved["controller"])
        progress_state = saved["progress"]
        set_rng_state(torch.load(resume_from / f"rng_rank{accelerator.process_index}.pt", weights_only=False))
        if main and log_path.exists():  # drop log lines written after the checkpoint
            kept = [line for line in log_path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= progress_state["step"]]
            atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and log_path.exists():
            log_path.unlink()  # a fresh start: the log of an earlier attempt would interleave with this one
        atomic_write(output_dir / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))
    if report_to:
        accelerator.init_trackers("ldmole", config={k: str(v) for k, v in config.items()})

    # ---- non-finite detection: device-side first-bad-step flags, read only at log/checkpoint/epoch points
    first_bad = torch.full((len(LOSS_TERMS),), -1, dtype=torch.long, device=accelerator.device)
    debug = bool(config["debug_nonfinite"])
    bad_modules = _record_nonfinite_modules(base) if debug else []

    def check_finite() -> None:
        flags = accelerator.reduce(first_bad, "max").tolist()
        bad = {name: s for name, s in zip(LOSS_TERMS, flags) if s >= 0}
        if not bad:
            return
        first = min(bad.values())
        latest = latest_checkpoint(output_dir)
        message = (f"non-finite loss at step {first}: component(s) {sorted(n for n, s in bad.items() if s == first)} "
                   f"became NaN/inf; last good checkpoint: {latest or 'none'} (resume=auto restarts from it). "
                   "Lower lr, enable grad clipping, or rerun with debug_nonfinite=true to find the first bad module")
        if bad_modules:
            message += f"; first module with a non-finite output: {bad_modules[0]}"
        raise NonFiniteLossError(message)

    # ---- loop
    step = progress_state["step"]
    running: dict[str, torch.Tensor] = {}
    running_micro = 0  # micro-batches summed into `running` since the last log line
    progress = tqdm(total=total_steps, initial=step, disable=not main, desc=f"{config['method']} {config['task']}")
    num_epochs = int(config["num_epochs"])
    save_every = int(config.get("save_every") or 0)
    while progress_state["epoch"] <= num_epochs and step < total_steps:
        epoch = progress_state["epoch"]
        loader = epoch_loader(epoch)
        micro_per_epoch = len(loader)  # per process; the last optimiser step of an epoch may get fewer than `accumulation`
        if progress_state["batches_done"]:
            loader = accelerator.skip_first_batches(loader, progress_state["batches_done"])
        for batch in loader:
            with accelerator.accumulate(wrapped):
                logits = wrapped(batch["input_ids"], batch["attention_mask"], batch["positions"])
                records = routing_records(base)
                terms = {"task": task_loss(logits, batch["targets"], float(config["label_smoothing"]))}
                if float(config["lb_coef"]):
                    terms["lb"] = float(config["lb_coef"]) * losses.load_balance_loss(
                        records, probs=str(config["lb_probs"]))
                if float(config["sparsity_coef"]):
                    terms["sparsity"] = float(config["sparsity_coef"]) * losses.sparsity_loss(records, int(config["sparsity_k"]))
                if float(config["z_coef"]):
                    terms["z"] = float(config["z_coef"]) * losses.router_z_loss(records)
                if controller is not None:
                    terms["l1"] = controller.penalty(records)
                    controller.observe(records)  # every micro-batch counts toward the step's sparsity
                for i, name in enumerate(LOSS_TERMS):
                    if name in terms:
                        nonfinite = ~torch.isfinite(terms[name].detach())
                        first_bad[i] = torch.where(nonfinite & (first_bad[i] < 0), step + 1, first_bad[i])
                loss = sum(terms.values())
                # accelerate divides by `accumulation`; a short last step of the epoch is rescaled so that
                # its gradient is the mean over the micro-batches it has, like every full step.
                step_start = progress_state["batches_done"] - progress_state["batches_done"] % accumulation
                in_step = min(accumulation, micro_per_epoch - step_start)
                accelerator.backward(loss * (accumulation / in_step))
                for name, value in terms.items():
                    running[name] = running.get(name, 0.0) + value.detach()
                running_micro += 1
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, float(config["grad_clip"]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    step_lr = scheduler.get_last_lr()[0]  # the lr this optimiser step used (logged below)
                    scheduler.step()
                    if controller is not None:
                        controller.update(reduce=lambda gap: accelerator.reduce(gap, "mean"))
            progress_state["batches_done"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress_state["step"] = step
            progress.update(1)
            if debug:
                check_finite()
            if step % int(config["log_every"]) == 0 or step == total_steps:
                check_finite()
                entry = {"step": step, "epoch": epoch, "lr": step_lr}
                entry.update({k: float(accelerator.reduce(v, "mean")) / running_micro for k, v in running.items()})
                if controller is not None:
                    entry["l1_coef"] = float(controller.coefficient)
                running, running_micro = {}, 0
                progress.set_postfix(loss=f"{sum(v for k, v in entry.items() if k in LOSS_TERMS):.4f}")
                if main:
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(entry) + "\n")
                if report_to:
                    accelerator.log(entry, step=step)
            if step >= total_steps:
                break
            if save_every and step % save_every == 0:
                save_checkpoint()
        check_finite()
        selection = evaluate(accelerator, wrapped, selection_loader, kind, config["task"], selection_examples)
        progress_state["history"].append({"epoch": epoch, "step": step, "selection_accuracy": selection["accuracy"]})
        if main:
            with open(log_path, "a") as handle:
                handle.write(json.dumps({"epoch_end": epoch, "step": step, "selection": selection}) + "\n")
        if selection["accuracy"] > progress_state["best"]["accuracy"]:
            progress_state["best"] = {"accuracy": selection["accuracy"], "epoch": epoch,
                                      "state": {k: v.detach().cpu().clone() for k, v in mole_parameters(base).items()}}
        if main and epoch in list(config.get("save_epoch_adapters") or []):
            save_mole(base, output_dir / f"adapter_epoch{epoch}")
        progress_state["epoch"], progress_state["batches_done"] = epoch + 1, 0
        if save_every and step < total_steps:
            save_checkpoint()
    progress.close()

    # ---- best epoch -> evaluation split, routing statistics, outputs
    best = progress_state["best"]
    with torch.no_grad():
        for name, param in mole_parameters(base).items():
            param.copy_(best["state"][name])
    stats = RoutingStats()
    final = evaluate(accelerator, wrapped, eval_loader, kind, config["task"], eval_examples, stats=stats)
    routing = stats.summary(reduce=lambda t: accelerator.reduce(t, "sum"))
    metrics = {
        **{k: v for k, v in final.items() if k != "num_examples"},
        "num_eval_examples": final["num_examples"],
        "num_train_examples": len(train_examples),
        "eval_split": "validation" if config["protocol"] == "reference" else task.spec.eval_split,
        "protocol": config["protocol"],
        "best_epoch": best["epoch"],
        "best_selection_accuracy": best["accuracy"],
        "history": progress_state["history"],
        "steps": step,
        "skipped_rows": task.skipped,
        "routing": routing,
        "model": config["model"], "task": config["task"], "method": config["method"], "seed": config["seed"],
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_time_s": round(time.time() - started, 1),
        "num_processes": accelerator.num_processes,
    }
    if main:
        save_mole(base, output_dir / "adapter")
        atomic_write(output_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    if report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return metrics


def broadcast_object(accelerator, value):
    """``value`` from the main process on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _eval_collate(batch: list[dict], collate_fn, kind: str) -> dict:
    """Evaluation batches score the last prompt position only."""
    out = collate_fn(batch)
    if kind == "qa":
        out["positions"] = out["last_prompt_index"].unsqueeze(1)
    return out
