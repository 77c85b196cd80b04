"""Train / selection / evaluation splits of a task under the two protocols of docs/method.md §4.

- protocol "selection" (default): a selection split is carved out of train and used to pick the
  best epoch; results are reported on the task's evaluation split, which training never sees.
- protocol "reference": selection = evaluation = the evaluation split, as the reference release
  does (it picks the best epoch on the split it reports).

MMLU-Pro has no train split: its test split is carved 80/10/10 into train / validation / test,
always with seed 42 (independent of ``seed``) so the benchmark does not move with the training seed.
The carve repeats what the reference release gets from two ``datasets`` ``train_test_split`` calls
with seed 42, so the three parts hold the same rows in the same order: held-out size
ceil(0.2 n), train floor(0.8 n), both from ``numpy.random.default_rng(42).permutation(n)``; the
held-out part is split again by ``default_rng(42).permutation`` into test ceil(0.5 m) first and
validation floor(0.5 m). For the 12032 test rows: train 9625, validation 1203, test 1204.
Validation is the selection split and test the evaluation split; under "reference" both are the
validation carve (what the reference release trains against and reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TypeVar, Union

import numpy as np

from .examples import Example, rows_to_examples
from .rows import SourceRow, load_split_rows
from .tasks import TaskSpec, get_task
from ...core.suggest import did_you_mean

__all__ = ["TaskData", "load_task", "carve_train_validation_test", "carve_selection", "PROTOCOLS",
           "default_selection_size", "MMLU_PRO_CARVE_SEED", "MAX_SELECTION_SIZE"]

PROTOCOLS = ("selection", "reference")
MMLU_PRO_CARVE_SEED = 42
MAX_SELECTION_SIZE = 500
T = TypeVar("T")


@dataclass
class TaskData:
    """The examples one run uses: ``train`` to fit, ``selection`` to pick the best epoch,
    ``evaluation`` to report. ``skipped`` counts malformed rows dropped from each of the three."""

    spec: TaskSpec
    train: list[Example]
    selection: list[Example]
    evaluation: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)


def carve_train_validation_test(count: int, seed: int = MMLU_PRO_CARVE_SEED) -> tuple[list[int], list[int], list[int]]:
    """Row indices of an 80/10/10 carve of ``count`` rows (train, validation, test), as the
    reference release's two ``train_test_split(seed=seed)`` calls produce them."""
    heldout_size = math.ceil((0.1 + 0.1) * count)  # same float arithmetic as the reference's call
    train_size = math.floor((1 - (0.1 + 0.1)) * count)
    order = np.random.default_rng(seed).permutation(count)
    heldout, train = order[:heldout_size], order[heldout_size : heldout_size + train_size]
    test_size = math.ceil(0.5 * heldout_size)
    validation_size = math.floor(0.5 * heldout_size)
    inner = np.random.default_rng(seed).permutation(heldout_size)
    test = heldout[inner[:test_size]]
    validation = heldout[inner[test_size : test_size + validation_size]]
    return train.tolist(), validation.tolist(), test.tolist()


def carve_selection(items: Sequence[T], size: int, seed: int) -> tuple[list[T], list[T]]:
    """(rest, selection): ``size`` items drawn with ``numpy.random.default_rng(seed)``; both keep
    the original order."""
    if not 1 <= size < len(items):
        raise ValueError(f"selection_size={size} must lie in [1, {len(items) - 1}] for {len(items)} training rows")
    chosen = set(np.random.default_rng(seed).permutation(len(items))[:size].tolist())
    rest = [item for index, item in enumerate(items) if index not in chosen]
    selection = [item for index, item in enumerate(items) if index in chosen]
    return rest, selection


def default_selection_size(train_count: int) -> int:
    """10% of the training rows, at most 500 (and at least 1)."""
    return max(1, min(MAX_SELECTION_SIZE, train_count // 10))


def load_task(
    task: Union[str, TaskSpec],
    data_dir: Union[str, Path, None] = None,
    *,
    protocol: str = "selection",
    selection_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: bool = False,
    eval_only: bool = False,
) -> TaskData:
    """Load a task's examples (``task``: a registered name or a spec) under ``protocol`` ("selection" or
    "reference", see the module doc).

    ``data_dir`` holds ``<local_dir>/<split>.jsonl`` files; None loads from the hub.
    ``selection_size`` (protocol "selection"; default min(500, 10% of train)) and ``seed`` set the
    selection carve; MMLU-Pro's selection split is its fixed validation carve, so it takes no
    ``selection_size``. ``eval_only`` loads only what needs no training data (train, and under
    "selection" the selection split, stay empty): for tasks whose train split is not available.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}{did_you_mean(protocol, PROTOCOLS)}; "
                         f"valid protocols: {', '.join(PROTOCOLS)}")
    if spec.carved_from_one_split and selection_size is not None:
        raise ValueError(
            f"task {spec.name!r} selects on its fixed 10% validation carve; drop selection_size={selection_size}"
        )
    train_rows, selection_rows, evaluation_rows = _split_rows(
        spec, data_dir, protocol, selection_size, seed, eval_only
    )
    train, train_skipped = rows_to_examples(spec, train_rows, spec.train_split, skip_bad_rows, training=True)
    evaluation, evaluation_skipped = rows_to_examples(spec, evaluation_rows, spec.eval_split, skip_bad_rows)
    if selection_rows is evaluation_rows:
        selection, selection_skipped = evaluation, evaluation_skipped
    else:
        selection, selection_skipped = rows_to_examples(spec, selection_rows, spec.train_split, skip_bad_rows)
    skipped = {"train": train_skipped, "selection": selection_skipped, "evaluation": evaluation_skipped}
    return TaskData(spec=spec, train=train, selection=selection, evaluation=evaluation, skipped=skipped)


def _split_rows(
    spec: TaskSpec,
    data_dir: Union[str, Path, None],
    protocol: str,
    selection_size: Optional[int],
    seed: int,
    eval_only: bool,
) -> tuple[list[SourceRow], list[SourceRow], list[SourceRow]]:
    """Raw rows of (train, selection, evaluation); under "reference" selection *is* evaluation."""
    if spec.carved_from_one_split:
        rows = load_split_rows(spec, spec.train_split, data_dir)
        train_ids, validation_ids, test_ids = carve_train_validation_test(len(rows))
        validation = [rows[i] for i in validation_ids]
        train = [] if eval_only else [rows[i] for i in train_ids]
        if protocol == "reference":
            return train, validation, validation
        return train, [] if eval_only else validation, [rows[i] for i in test_ids]
    evaluation = load_split_rows(spec, spec.eval_split, data_dir)
    train: list[SourceRow] = [] if eval_only else _train_rows(spec, data_dir)
    if protocol == "reference":
        return train, evaluation, evaluation
    if eval_only:
        return [], [], evaluation
    size = default_selection_size(len(train)) if selection_size is None else selection_size
    rest, selection = carve_selection(train, size, seed)
    return rest, selection, evaluation


def _train_rows(spec: TaskSpec, data_dir: Union[str, Path, None]) -> list[SourceRow]:
    """The training rows, with a hint about ``eval_only`` when they are not available locally."""
    try:
        return load_split_rows(spec, spec.train_split, data_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; or pass eval_only=True to load only the evaluation split") from exc
