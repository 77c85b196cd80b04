"""Scoring a model on a task: option-letter scores for QA, class logits for classification, the task
metrics, prediction over a loader (:func:`evaluate`, with routing statistics: :func:`evaluate_routing`)
and the autocast of a run's precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.records import routing_records
from .routing_stats import RoutingStats
from .selected_logits import SelectedLogits

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from .data.examples import Example
    from .data.tasks import TaskSpec

__all__ = ["option_scores", "answer_counts", "qa_metrics", "classification_metrics", "evaluate", "evaluate_routing"]


def option_scores(logits: torch.Tensor, option_token_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """Per-option scores ``[B, O]`` from last-position logits ``[B, V]``.

    Each option's score is the highest logit among its letter's token variants ("A" and " A");
    padded variants (-1) and padded options score -inf.
    """
    ids = option_token_ids.clamp_min(0)
    picked = logits.gather(-1, ids.flatten(1)).view(ids.shape)
    picked = picked.masked_fill(option_token_ids < 0, float("-inf"))
    return picked.amax(-1).masked_fill(~option_mask, float("-inf"))


def answer_counts(predictions: np.ndarray, golds: np.ndarray) -> dict:
    """How often each class / option index was predicted and is gold, keyed by the index as a string.

    A run whose ``prediction_counts`` has a single key answers the same for every example, which
    accuracy alone does not show when it equals the majority-class rate.
    """
    def count(values: np.ndarray) -> dict[str, int]:
        keys, counts = np.unique(values, return_counts=True)
        return {str(int(k)): int(c) for k, c in zip(keys, counts)}

    return {"prediction_counts": count(predictions), "label_counts": count(golds)}


def _accuracy(predictions: np.ndarray, golds: np.ndarray) -> float:
    """The fraction of correct predictions (NaN without examples)."""
    return float((predictions == golds).mean()) if len(golds) else float("nan")


def qa_metrics(predictions: np.ndarray, answers: np.ndarray,
               categories: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Accuracy, and per-category accuracy when categories are given (MMLU-Pro)."""
    metrics = {"accuracy": _accuracy(predictions, answers), **answer_counts(predictions, answers)}
    if categories is not None and any(c is not None for c in categories):
        per_category: dict[str, list[bool]] = {}
        for category, ok in zip(categories, predictions == answers):
            per_category.setdefault(str(category), []).append(bool(ok))
        metrics["per_category"] = {c: {"accuracy": float(np.mean(v)), "count": len(v)}
                                   for c, v in sorted(per_category.items())}
    return metrics


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, extra_metrics: Sequence[str] = ()) -> dict:
    """Accuracy and answer counts; ``extra_metrics`` may add ``mcc`` (Matthews correlation, CoLA) and
    ``f1`` (F1 of the positive class, MRPC)."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    metrics = {"accuracy": _accuracy(predictions, labels), **answer_counts(predictions, labels)}
    if "mcc" in extra_metrics:
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    if "f1" in extra_metrics:
        metrics["f1"] = float(f1_score(labels, predictions, zero_division=0))
    return metrics


def _same(value):
    return value


@torch.no_grad()
def evaluate(model: nn.Module, loader: "DataLoader", task: "TaskSpec", examples: Sequence["Example"],
             autocast: Callable = nullcontext, gather: Callable = _same,
             observe: Optional[Callable[[dict], None]] = None) -> dict:
    """Accuracy and task metrics of ``model`` (a :class:`SelectedLogits`, in eval mode, restored after) on
    ``loader`` (batches of ``eval_collate``) of ``examples``: the task kind scores each batch and computes
    the metrics, with the task's extra metrics.

    ``autocast`` and ``gather`` are accelerate's in a training run (gather drops the duplicates a
    distributed sampler pads with); ``observe(batch)`` runs after each forward, e.g. to read the
    routing records.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kind = task.task_kind
    predictions, golds, indices = [], [], []
    for batch in loader:
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])[:, 0].float()
        if observe is not None:
            observe(batch)
        scores, gold = kind.scores(logits, batch)
        pred, gold, index = gather((scores.argmax(-1), gold, batch["example_index"]))
        predictions.append(pred.cpu())
        golds.append(gold.cpu())
        indices.append(index.cpu())
    model.train(was_training)
    pred = torch.cat(predictions).numpy()
    gold = torch.cat(golds).numpy()
    index = torch.cat(indices).numpy()
    metrics = kind.metrics(pred, gold, [examples[i] for i in index], task)
    metrics["num_examples"] = int(len(pred))
    return metrics


def evaluate_routing(model: nn.Module, loader: "DataLoader", task: "TaskSpec", examples: Sequence["Example"],
                     routing: RoutingStats, autocast: Callable = nullcontext, progress: Optional[str] = None) -> dict:
    """:func:`evaluate` of a MoLE model (not wrapped) that adds every forward's routing records to
    ``routing``; ``progress`` names a tqdm bar over the batches (None: no bar)."""
    if progress is not None:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=progress, unit="batch")
    return evaluate(SelectedLogits(model), loader, task, examples, autocast=autocast,
                    observe=lambda batch: routing.update(routing_records(model), batch["input_ids"],
                                                         batch["attention_mask"]))
