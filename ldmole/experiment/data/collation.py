"""Token features -> padded batches: padding (`collate`), the positions whose logits a batch is trained
and scored on (`answer_positions` and the position functions task kinds name), and the collate
functions of training (`train_collate`) and scoring (`eval_collate`), tensors only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from .features import IGNORE_INDEX

if TYPE_CHECKING:
    from .task_kinds import TaskKind

__all__ = ["collate", "answer_positions", "supervised_positions", "last_prompt_position", "last_token_positions",
           "last_token_position", "train_collate", "eval_collate"]

# Host-side keys that batches on the device do not carry (lists, or what the positions were computed from).
_HOST_KEYS = ("uid", "category", "labels", "sequence_lengths")


def collate(
    batch: Sequence[dict[str, Any]], pad_token_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, Any]:
    """Pad a list of `encode_qa` or `encode_classification` outputs into tensors.

    Always: ``input_ids``, ``attention_mask`` [B, T], ``sequence_lengths`` [B], ``uid`` (list).
    QA adds ``labels`` [B, T] (-100 on padding), ``last_prompt_index`` [B] (the position whose
    logits score the options, padding included), ``answer`` [B], ``option_token_ids``
    [B, max_options, max_variants] (-1 fill), ``option_mask`` [B, max_options] (bool) and
    ``category`` (list). Classification adds ``label`` [B] and ``last_token_index`` [B].
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    lengths = [len(features["input_ids"]) for features in batch]
    width = max(lengths)
    offsets = [width - length if padding_side == "left" else 0 for length in lengths]

    def pad(values: list[int], fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + values if padding_side == "left" else values + padding

    out: dict[str, Any] = {
        "input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in batch], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * n, 0) for n in lengths], dtype=torch.long),
        "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        "uid": [f.get("uid") for f in batch],
    }
    if "labels" in batch[0]:
        out["labels"] = torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in batch], dtype=torch.long)
        out["last_prompt_index"] = torch.tensor(
            [offset + f["prompt_length"] - 1 for offset, f in zip(offsets, batch)], dtype=torch.long
        )
        out["answer"] = torch.tensor([f["answer"] for f in batch], dtype=torch.long)
        out["option_token_ids"], out["option_mask"] = _option_tensor([f["option_token_ids"] for f in batch])
        out["category"] = [f.get("category") for f in batch]
    else:
        out["label"] = torch.tensor([f["label"] for f in batch], dtype=torch.long)
        out["last_token_index"] = torch.tensor(
            [offset + n - 1 for offset, n in zip(offsets, lengths)], dtype=torch.long
        )
    return out


def _option_tensor(options: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_options, max_variants] candidate ids (-1 fill) and the [B, max_options] option mask."""
    max_options = max(len(per_example) for per_example in options)
    max_variants = max(len(ids) for per_example in options for ids in per_example)
    ids = torch.full((len(options), max_options, max_variants), -1, dtype=torch.long)
    mask = torch.zeros((len(options), max_options), dtype=torch.bool)
    for row, per_example in enumerate(options):
        for column, variants in enumerate(per_example):
            ids[row, column, : len(variants)] = torch.tensor(variants, dtype=torch.long)
            mask[row, column] = True
    return ids, mask


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


def supervised_positions(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """QA training: every supervised token of a padded batch (the answer letter and the end marker)."""
    return answer_positions(batch["labels"])


def last_prompt_position(batch: dict[str, Any]) -> torch.Tensor:
    """QA scoring: the last prompt token, whose logits score the option letters ``[B, 1]``."""
    return batch["last_prompt_index"].unsqueeze(1)


def last_token_positions(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification training: the last real token (read by the head) and the label, ``[B, 1]`` each."""
    return batch["last_token_index"].unsqueeze(1), batch["label"].unsqueeze(1)


def last_token_position(batch: dict[str, Any]) -> torch.Tensor:
    """Classification scoring: the last real token ``[B, 1]``."""
    return batch["last_token_index"].unsqueeze(1)


def _indexed(batch: list[dict], pad_token_id: int) -> dict:
    """A padded batch with each row's ``example_index``."""
    out = collate(batch, pad_token_id)
    out["example_index"] = torch.tensor([item["example_index"] for item in batch], dtype=torch.long)
    return out


def _tensors_only(out: dict) -> dict:
    """``out`` without the host-side keys."""
    for key in _HOST_KEYS:
        out.pop(key, None)
    return out


def train_collate(batch: list[dict], pad_token_id: int, task_kind: "TaskKind") -> dict:
    """A padded batch plus the positions whose logits the loss needs and their targets (the task kind's)."""
    out = _indexed(batch, pad_token_id)
    out["positions"], out["targets"] = task_kind.train_positions(out)
    return _tensors_only(out)


def eval_collate(batch: list[dict], pad_token_id: int, task_kind: "TaskKind") -> dict:
    """A padded batch plus the one position it is scored at (the task kind's)."""
    out = _indexed(batch, pad_token_id)
    out["positions"] = task_kind.eval_positions(out)
    return _tensors_only(out)
