"""Task registry: where each benchmark lives (hub and local copy) and which splits it uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ...core.suggest import did_you_mean

__all__ = ["TaskSpec", "TASKS", "get_task"]

QA_MAX_LENGTH = 1024
GLUE_MAX_LENGTH = 512


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: its kind, its Hugging Face and local locations, and its splits (docs/method.md §4).

    ``train_split`` and ``eval_split`` are split names of the source dataset. When
    ``carved_from_one_split`` is true (MMLU-Pro, which has no train split) both name the same split
    and ``load_task`` carves it 80/10/10 into train / validation / test.
    """

    name: str
    kind: Literal["qa", "classification"]
    hub_path: str
    hub_config: Optional[str]
    local_dir: str
    train_split: str = "train"
    eval_split: str = "validation"
    num_labels: Optional[int] = None
    max_length: int = QA_MAX_LENGTH
    carved_from_one_split: bool = False


def _glue(name: str) -> TaskSpec:
    """A binary GLUE classification task evaluated on its validation split."""
    return TaskSpec(
        name=name, kind="classification", hub_path="nyu-mll/glue", hub_config=name,
        local_dir=f"glue_{name}", num_labels=2, max_length=GLUE_MAX_LENGTH,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_c", "qa", "allenai/ai2_arc", "ARC-Challenge", "arc_challenge"),
        TaskSpec("arc_e", "qa", "allenai/ai2_arc", "ARC-Easy", "arc_easy"),
        TaskSpec("csqa", "qa", "tau/commonsense_qa", None, "commonsense_qa"),
        TaskSpec("obqa", "qa", "allenai/openbookqa", "main", "openbookqa"),
        TaskSpec("hellaswag", "qa", "Rowan/hellaswag", None, "hellaswag"),
        TaskSpec("swag", "qa", "allenai/swag", "regular", "swag"),
        TaskSpec(
            "mmlu_pro", "qa", "TIGER-Lab/MMLU-Pro", None, "mmlu_pro",
            train_split="test", eval_split="test", carved_from_one_split=True,
        ),
        _glue("cola"),
        _glue("rte"),
        _glue("mrpc"),
    )
}


def get_task(name: str) -> TaskSpec:
    """The registered task called ``name``; a ValueError lists the valid names otherwise."""
    if name in TASKS:
        return TASKS[name]
    raise ValueError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; valid tasks: {', '.join(TASKS)}")
