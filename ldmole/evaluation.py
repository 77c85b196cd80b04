"""Scoring: option-letter logits for QA, class logits for GLUE, and the task metrics."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["option_scores", "classification_metrics", "qa_metrics"]


def option_scores(logits: torch.Tensor, option_token_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """Per-option scores ``[B, O]`` from last-position logits ``[B, V]``.

    Each option's score is the highest logit among its letter's token variants ("A" and " A");
    padded variants (-1) and padded options score -inf.
    """
    ids = option_token_ids.clamp_min(0)
    picked = logits.gather(-1, ids.flatten(1)).view(ids.shape)
    picked = picked.masked_fill(option_token_ids < 0, float("-inf"))
    return picked.amax(-1).masked_fill(~option_mask, float("-inf"))


def qa_metrics(predictions: np.ndarray, answers: np.ndarray, categories: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Accuracy, and per-category accuracy when categories are given (MMLU-Pro)."""
    correct = predictions == answers
    metrics = {"accuracy": float(correct.mean()) if len(correct) else float("nan")}
    if categories is not None and any(c is not None for c in categories):
        per_category: dict[str, list[bool]] = {}
        for category, ok in zip(categories, correct):
            per_category.setdefault(str(category), []).append(bool(ok))
        metrics["per_category"] = {c: {"accuracy": float(np.mean(v)), "count": len(v)} for c, v in sorted(per_category.items())}
    return metrics


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, task: str) -> dict:
    """Accuracy; Matthews correlation for CoLA, F1 of the positive class for MRPC."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    metrics = {"accuracy": float((predictions == labels).mean()) if len(labels) else float("nan")}
    if task == "cola":
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    if task == "mrpc":
        metrics["f1"] = float(f1_score(labels, predictions, zero_division=0))
    return metrics
