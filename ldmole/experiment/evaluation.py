"""Scoring: option-letter logits for QA, class logits for GLUE, and the task metrics."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["option_scores", "classification_metrics", "qa_metrics", "answer_counts"]


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


def qa_metrics(predictions: np.ndarray, answers: np.ndarray, categories: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Accuracy, and per-category accuracy when categories are given (MMLU-Pro)."""
    correct = predictions == answers
    metrics = {"accuracy": float(correct.mean()) if len(correct) else float("nan"), **answer_counts(predictions, answers)}
    if categories is not None and any(c is not None for c in categories):
        per_category: dict[str, list[bool]] = {}
        for category, ok in zip(categories, correct):
            per_category.setdefault(str(category), []).append(bool(ok))
        metrics["per_category"] = {c: {"accuracy": float(np.mean(v)), "count": len(v)} for c, v in sorted(per_category.items())}
    return metrics


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, task: str) -> dict:
    """Accuracy; Matthews correlation for CoLA, F1 of the positive class for MRPC."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    metrics = {"accuracy": float((predictions == labels).mean()) if len(labels) else float("nan"),
               **answer_counts(predictions, labels)}
    if task == "cola":
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    if task == "mrpc":
        metrics["f1"] = float(f1_score(labels, predictions, zero_division=0))
    return metrics
