"""Task kinds: what tasks of one family share, so that nothing else switches on QA versus classification.

A :class:`TaskKind` owns how an example becomes token features (``encode``), which positions a batch is
trained and scored at, how the logits there become per-answer scores and the task metrics, and which
base model the family needs (its transformers Auto class and the ``model_kind`` adapter_info.json
records). Two kinds exist: :data:`QA_KIND` (multiple choice scored by the logits of the option letters,
a causal LM) and :data:`CLASSIFICATION_KIND` (a sequence classifier whose head reads the last token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..evaluation import classification_metrics, option_scores, qa_metrics
from .collation import last_prompt_position, last_token_position, last_token_positions, supervised_positions
from .features import encode_classification, encode_qa

if TYPE_CHECKING:
    from .examples import Example
    from .tasks import TaskSpec

__all__ = ["TaskKind", "QA_KIND", "CLASSIFICATION_KIND", "TASK_KINDS", "task_kind_for_model"]


@dataclass(frozen=True)
class TaskKind:
    """How tasks of one family are encoded, batched, scored and modelled.

    ``model_kind`` is what ``adapter_info.json`` records for the base model ("causal_lm" or
    "classification"); ``auto_model`` names the transformers Auto class that builds it, and
    ``label_head`` says whether that model ends in a ``num_labels``-way head (its tasks then need
    ``num_labels``). ``extra_metrics`` are the metrics beyond accuracy that its tasks may ask for.
    """

    name: str
    title: str  # in messages: "a QA task", "a classification task"
    model_kind: str
    auto_model: str
    label_head: bool
    encode: Callable[..., dict[str, Any]]  # (example, tokenizer, chat_format, max_length, truncate=) -> features
    train_positions: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]  # padded batch -> positions, targets
    eval_positions: Callable[[dict], torch.Tensor]  # padded batch -> the scored position [B, 1]
    scores: Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]  # logits [B, C], batch -> scores, gold
    metrics: Callable[[np.ndarray, np.ndarray, Sequence["Example"], "TaskSpec"], dict]
    extra_metrics: tuple[str, ...] = ()


def _option_letter_scores(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """QA: each option's best letter-variant logit, and the gold option."""
    return option_scores(logits, batch["option_token_ids"], batch["option_mask"]), batch["answer"]


def _class_scores(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification: the head's logits are the scores; the gold label."""
    return logits, batch["label"]


def _qa_task_metrics(predictions: np.ndarray, answers: np.ndarray, examples: Sequence["Example"],
                     task: "TaskSpec") -> dict:
    """:func:`qa_metrics`, per category when the task asks for ``per_category``."""
    categories = [example.category for example in examples] if "per_category" in task.extra_metrics else None
    return qa_metrics(predictions, answers, categories)


def _classification_task_metrics(predictions: np.ndarray, labels: np.ndarray, examples: Sequence["Example"],
                                 task: "TaskSpec") -> dict:
    """:func:`classification_metrics` with the task's extra metrics."""
    return classification_metrics(predictions, labels, task.extra_metrics)


QA_KIND = TaskKind(
    name="letter_qa", title="QA", model_kind="causal_lm", auto_model="AutoModelForCausalLM", label_head=False,
    encode=encode_qa, train_positions=supervised_positions, eval_positions=last_prompt_position,
    scores=_option_letter_scores, metrics=_qa_task_metrics, extra_metrics=("per_category",))

CLASSIFICATION_KIND = TaskKind(
    name="sequence_classification", title="classification", model_kind="classification",
    auto_model="AutoModelForSequenceClassification", label_head=True, encode=encode_classification,
    train_positions=last_token_positions, eval_positions=last_token_position, scores=_class_scores,
    metrics=_classification_task_metrics, extra_metrics=("mcc", "f1"))

TASK_KINDS: tuple[TaskKind, ...] = (QA_KIND, CLASSIFICATION_KIND)


def task_kind_for_model(model_kind: str) -> TaskKind:
    """The task kind whose base model ``adapter_info.json`` records as ``model_kind``.

    Raises:
        ValueError: no kind has that model kind (naming the valid ones).
    """
    for kind in TASK_KINDS:
        if kind.model_kind == model_kind:
            return kind
    valid = ", ".join(kind.model_kind for kind in TASK_KINDS)
    raise ValueError(f"model_kind={model_kind!r} is unknown; adapter_info.json's model_kind must be one of {valid}")
