"""The task registry: each benchmark's kind, row converter, locations, splits, metrics and title.

A task is one :class:`TaskSpec`: its :class:`~.task_kinds.TaskKind` (letter-scored QA or sequence
classification) decides encoding, scored positions, metrics and the base model; its converter turns a
row of its data into an `Example`. :func:`register_task` adds a task from outside the package (a spec,
a converter and ``<data_dir>/<local_dir>/<split>.jsonl`` files), which ``task=`` then selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...core.suggest import did_you_mean
from .converters import (hellaswag_example, labelled_choices_converter, mmlu_pro_example, sentence_pair_example,
                         single_sentence_example, swag_example)
from .examples import Converter
from .task_kinds import CLASSIFICATION_KIND, QA_KIND, TaskKind

__all__ = ["TaskSpec", "TASKS", "BUILTIN_TASKS", "get_task", "register_task"]

QA_MAX_LENGTH = 1024
GLUE_MAX_LENGTH = 512


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: its kind and row converter, its Hugging Face and local locations, its splits
    (docs/method.md §4), the metrics it reports beyond accuracy and its title in tables.

    ``train_split`` and ``eval_split`` are split names of the source dataset. When
    ``carved_from_one_split`` is true (MMLU-Pro, which has no train split) both name the same split
    and ``load_task`` carves it 80/10/10 into train / validation / test. ``hub_path`` None: local data
    only. ``extra_metrics`` are among the kind's (``per_category``; ``mcc``, ``f1``); ``eval_size`` is the
    size of the evaluation split under the default protocol (tables mark runs scored on fewer).
    """

    name: str
    task_kind: TaskKind
    converter: Converter
    title: str
    local_dir: str
    hub_path: Optional[str] = None
    hub_config: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    num_labels: Optional[int] = None
    max_length: int = QA_MAX_LENGTH
    carved_from_one_split: bool = False
    extra_metrics: tuple[str, ...] = ()
    eval_size: Optional[int] = None


def _choices(name: str, title: str, hub_path: str, hub_config: Optional[str], local_dir: str, eval_size: int,
             question_field: str = "question", stem_prefix: str = "") -> TaskSpec:
    """An ARC / CSQA / OBQA task (``choices`` and ``answerKey`` rows)."""
    return TaskSpec(name, QA_KIND, labelled_choices_converter(question_field, stem_prefix), title, local_dir,
                    hub_path, hub_config, eval_size=eval_size)


def _glue(name: str, title: str, eval_size: int, converter: Converter, extra_metrics: tuple[str, ...] = ()) -> TaskSpec:
    """A binary GLUE classification task evaluated on its validation split."""
    return TaskSpec(name, CLASSIFICATION_KIND, converter, title, f"glue_{name}", "nyu-mll/glue", name, num_labels=2,
                    max_length=GLUE_MAX_LENGTH, extra_metrics=extra_metrics, eval_size=eval_size)


_BUILTIN_SPECS = (
    _choices("arc_c", "ARC-C", "allenai/ai2_arc", "ARC-Challenge", "arc_challenge", 299),
    _choices("arc_e", "ARC-E", "allenai/ai2_arc", "ARC-Easy", "arc_easy", 570),
    _choices("csqa", "CSQA", "tau/commonsense_qa", None, "commonsense_qa", 1221),
    _choices("obqa", "OBQA", "allenai/openbookqa", "main", "openbookqa", 500, "question_stem", "Question: "),
    TaskSpec("hellaswag", QA_KIND, hellaswag_example, "HellaSwag", "hellaswag", "Rowan/hellaswag", eval_size=10042),
    TaskSpec("swag", QA_KIND, swag_example, "SWAG", "swag", "allenai/swag", "regular", eval_size=20006),
    TaskSpec("mmlu_pro", QA_KIND, mmlu_pro_example, "MMLU-Pro", "mmlu_pro", "TIGER-Lab/MMLU-Pro", train_split="test",
             eval_split="test", carved_from_one_split=True, extra_metrics=("per_category",), eval_size=1204),
    _glue("cola", "CoLA", 1043, single_sentence_example, ("mcc",)),
    _glue("rte", "RTE", 277, sentence_pair_example),
    _glue("mrpc", "MRPC", 408, sentence_pair_example, ("f1",)),
)

TASKS: dict[str, TaskSpec] = {}  # every registered task by name: the built-in ones, then register_task's


def register_task(spec: TaskSpec) -> TaskSpec:
    """Adds ``spec`` to :data:`TASKS` (so that ``task=<name>`` selects it) and returns it.

    Raises:
        ValueError: the name is taken or not an identifier, ``num_labels`` is missing for a kind with a
            label head, an extra metric is not one the kind reports, or a carved task names two splits
            (each naming the field to change).
        TypeError: ``task_kind`` is not a :class:`TaskKind` or ``converter`` is not callable.
    """
    where = f"register_task({spec.name!r})"
    if not spec.name.isidentifier():
        raise ValueError(f"{where}: name must be an identifier (letters, digits, _), as task= takes it")
    if spec.name in TASKS:
        raise ValueError(f"{where}: task {spec.name!r} is already registered ({TASKS[spec.name].title}); "
                         "choose another name")
    if not isinstance(spec.task_kind, TaskKind):
        raise TypeError(f"{where}: task_kind must be a TaskKind such as QA_KIND or CLASSIFICATION_KIND, "
                        f"not {spec.task_kind!r}")
    if not callable(spec.converter):
        raise TypeError(f"{where}: converter must be a function (row, spec, uid, training) -> Example")
    kind = spec.task_kind
    if kind.label_head and (spec.num_labels is None or spec.num_labels < 2):
        raise ValueError(f"{where}: a {kind.title} task needs num_labels >= 2 (the size of its head), "
                         f"not {spec.num_labels!r}; set num_labels=")
    unknown = [name for name in spec.extra_metrics if name not in kind.extra_metrics]
    if unknown:
        raise ValueError(f"{where}: extra_metrics {unknown} are not reported for a {kind.title} task; "
                         f"choose from {list(kind.extra_metrics)}")
    if spec.carved_from_one_split and spec.train_split != spec.eval_split:
        raise ValueError(f"{where}: carved_from_one_split carves one split, but train_split={spec.train_split!r} "
                         f"and eval_split={spec.eval_split!r} differ; name the same split in both")
    TASKS[spec.name] = spec
    return spec


for _spec in _BUILTIN_SPECS:
    register_task(_spec)
BUILTIN_TASKS: tuple[str, ...] = tuple(spec.name for spec in _BUILTIN_SPECS)


def get_task(name: str) -> TaskSpec:
    """The registered task called ``name``; a ValueError lists the valid names otherwise."""
    if name in TASKS:
        return TASKS[name]
    raise ValueError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; valid tasks: {', '.join(TASKS)}")
