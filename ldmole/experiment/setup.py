"""What training, routing plots and the λ probe share: a run's task data, tokenizer and token
features; its base model; batches; and prediction over a loader (:func:`evaluate`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import TaskData, collate, encode_classification, encode_qa, get_chat_format, load_task, pad_token_id_for
from .data.features import IGNORE_INDEX
from .data.tasks import TaskSpec
from .evaluation import classification_metrics, option_scores, qa_metrics
from .models import language_model_parts, load_base_model, load_tokenizer, resolve_model_source
from .run_config import RunConfig

__all__ = ["SelectedLogits", "answer_positions", "train_collate", "eval_collate", "Encoder", "RunData",
           "load_run_task", "load_run_tokenizer", "load_run_data", "build_base_model", "eval_loader", "evaluate"]


class SelectedLogits(nn.Module):
    """Runs the decoder body and applies the head only at chosen positions (never the full vocab
    logits of every position). ``positions [B, K]`` -> logits ``[B, K, out]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A plain tuple, not submodules: registered again, body and head would be reached twice, which
        # FSDP1's auto-wrap rejects ("Child module ... is already wrapped"), and the state dict would repeat them.
        self.parts = language_model_parts(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        body, head = self.parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return head(picked)


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


def train_collate(batch: list[dict], pad_token_id: int, kind: str) -> dict:
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


def eval_collate(batch: list[dict], pad_token_id: int, kind: str) -> dict:
    """A training batch whose position is the one scored: the last prompt token (QA) or last token (GLUE)."""
    out = train_collate(batch, pad_token_id, kind)
    if kind == "qa":
        out["positions"] = out["last_prompt_index"].unsqueeze(1)
    return out


@dataclass
class Encoder:
    """Turns a task's examples into token features, each tagged with its index (to map gathered
    predictions back to examples)."""

    kind: str
    tokenizer: Any
    chat_format: Any
    max_length: int

    @classmethod
    def for_run(cls, config: RunConfig, spec: TaskSpec, tokenizer) -> "Encoder":
        """The encoder of a run: its chat format and max_length (the task's when unset)."""
        return cls(spec.kind, tokenizer, get_chat_format(config.backbone.chat_format),
                   config.data.max_length or spec.max_length)

    def __call__(self, examples, truncate: bool) -> list[dict]:
        encode = encode_qa if self.kind == "qa" else encode_classification
        features = []
        for index, example in enumerate(examples):
            item = encode(example, self.tokenizer, self.chat_format, self.max_length, truncate=truncate)
            item["example_index"] = index
            features.append(item)
        return features

    @property
    def pad_token_id(self) -> int:
        return pad_token_id_for(self.tokenizer)


def load_run_task(config: RunConfig, eval_only: bool = False) -> TaskData:
    """The run's task under its protocol and selection carve (``eval_only``: no training split needed)."""
    data = config.data
    return load_task(config.task, data.data_dir, protocol=data.protocol, selection_size=data.selection_size,
                     seed=config.seed, skip_bad_rows=data.skip_bad_rows, eval_only=eval_only)


def load_run_tokenizer(config: RunConfig):
    """The run's tokenizer: ``tokenizer`` when set, else the model's own."""
    return load_tokenizer(config.backbone.tokenizer or resolve_model_source(config.backbone.model_source))


@dataclass
class RunData:
    """A run's task, encoder and the examples it trains on, selects with and reports on."""

    task: TaskData
    encoder: Encoder
    train_examples: list
    selection_examples: list
    eval_examples: list


def load_run_data(config: RunConfig) -> RunData:
    """The task and tokenizer of a training run, its examples subsampled / capped as configured.

    Raises:
        ValueError: a split ends up empty (naming data_dir and the caps to lower).
    """
    task = load_run_task(config)
    train_examples = list(task.train)
    if config.data.train_max_examples:
        order = np.random.default_rng(config.seed).permutation(len(train_examples))
        train_examples = [train_examples[i] for i in order[: config.data.train_max_examples]]
    limit = config.data.eval_max_examples
    selection_examples = task.selection[:limit] if limit else task.selection
    eval_examples = task.evaluation[:limit] if limit else task.evaluation
    for name, examples in (("train", train_examples), ("selection", selection_examples), ("evaluation", eval_examples)):
        if not examples:
            raise ValueError(f"task {config.task!r}: the {name} split is empty; check the files under "
                             f"data_dir={config.data.data_dir!r} (or lower eval_max_examples / train_max_examples)")
    encoder = Encoder.for_run(config, task.spec, load_run_tokenizer(config))
    return RunData(task, encoder, train_examples, selection_examples, eval_examples)


def build_base_model(config: RunConfig, spec: TaskSpec, tokenizer) -> nn.Module:
    """The run's base model (no MoLE yet), created right after seeding with the run seed, so that a
    random base, and the MoLE weights injected next, are the same in training and in every rerun."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    return load_base_model(config.backbone, "causal_lm" if spec.kind == "qa" else "classification", tokenizer,
                           num_labels=spec.num_labels or 2)


def eval_loader(features: list[dict], batch_size: int, pad_token_id: int, kind: str, seed: int) -> DataLoader:
    """Batches for :func:`evaluate`, in order. Its own generator: creating an iterator must not draw
    from the global RNG that dropout uses, or a resumed run would see other dropout masks."""
    return DataLoader(features, batch_size=batch_size, collate_fn=partial(eval_collate, pad_token_id=pad_token_id,
                                                                          kind=kind),
                      generator=torch.Generator().manual_seed(seed))


def _same(value):
    return value


@torch.no_grad()
def evaluate(model: SelectedLogits, loader: DataLoader, kind: str, task: str, examples,
             autocast: Callable = nullcontext, gather: Callable = _same,
             observe: Optional[Callable[[dict], None]] = None) -> dict:
    """Accuracy and task metrics of ``model`` (in eval mode, restored after) on ``loader``.

    ``autocast`` and ``gather`` are accelerate's in a training run (gather drops the duplicates a
    distributed sampler pads with); ``observe(batch)`` runs after each forward, e.g. to read the
    routing records.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions, golds, indices = [], [], []
    for batch in loader:
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])[:, 0].float()
        if observe is not None:
            observe(batch)
        if kind == "qa":
            scores = option_scores(logits, batch["option_token_ids"], batch["option_mask"])
            gold = batch["answer"]
        else:
            scores, gold = logits, batch["label"]
        pred, gold, index = gather((scores.argmax(-1), gold, batch["example_index"]))
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
