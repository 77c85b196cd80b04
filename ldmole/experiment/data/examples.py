"""Raw rows -> `Example`: what every task's row converter builds on.

A converter (``TaskSpec.converter``) turns one row into an `Example`: QA rows into a prompt in the
shared multiple-choice layout (`multiple_choice_prompt`, `qa_example`), classification rows into their
raw sentences and label. It reads fields with `field_value`, `text_field`, `option_texts` and
`class_index`, which raise `FieldProblem`; `convert_row` adds the row's file and line to it. The
built-in tasks' converters and their prompts are in ``converters.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .rows import SourceRow

if TYPE_CHECKING:
    from .tasks import TaskSpec

__all__ = [
    "Example", "MalformedRowError", "FieldProblem", "Converter", "LETTERS", "MAX_OPTIONS",
    "multiple_choice_prompt", "labelled_sentences", "field_value", "text_field", "option_texts", "class_index",
    "qa_example", "convert_row", "rows_to_examples",
]

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J")
MAX_OPTIONS = len(LETTERS)
MIN_OPTIONS = 2


@dataclass
class Example:
    """One task item. QA: ``prompt`` (user text, no chat tokens), ``options`` (the letters used,
    "A".."J"), ``answer`` (index into options), ``category`` (MMLU-Pro only). Classification:
    ``sentences`` (the raw input sentences, one or two) and ``label``. ``uid`` is
    "<task>/<split>/<row number>".
    """

    uid: str
    prompt: Optional[str] = None
    options: Optional[list[str]] = None
    answer: Optional[int] = None
    category: Optional[str] = None
    sentences: Optional[tuple[str, ...]] = None
    label: Optional[int] = None


# A task's row converter: (row, its task, uid, training) -> Example; it raises FieldProblem for a bad field.
Converter = Callable[[Mapping[str, Any], "TaskSpec", str, bool], Example]


class MalformedRowError(ValueError):
    """A row that cannot become an Example; the message names its file, line and field."""


class FieldProblem(Exception):
    """A field of a row is missing or wrong (raised by converters); `convert_row` adds the row's location."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


def multiple_choice_prompt(instruction: str, stem: str, options: Sequence[str], blank_line: bool) -> str:
    """The shared QA layout: instruction, stem, lettered options, an optional blank line, 'Answer: '."""
    lines = [instruction, stem, "Options:"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines) + ("\n\n" if blank_line else "\n") + "Answer: "


def labelled_sentences(sentences: Sequence[str]) -> str:
    """A GLUE input as the user text of a chat turn: "Sentence: s", or "Sentence 1: s1\\nSentence 2: s2".

    The reference release has no text here (it joins raw sentences with a separator token, see
    ``ChatFormat.sentence_separator``); a chat turn needs plain text that tells the two apart.
    """
    if len(sentences) == 1:
        return f"Sentence: {sentences[0]}"
    return "\n".join(f"Sentence {number}: {sentence}" for number, sentence in enumerate(sentences, start=1))


def field_value(row: Mapping[str, Any], field: str) -> Any:
    """The field's value; a missing or null field is a problem."""
    value = row.get(field)
    if value is None:
        raise FieldProblem(field, "missing (absent or null)")
    return value


def text_field(row: Mapping[str, Any], field: str, allow_empty: bool = False) -> str:
    """The field as a stripped string."""
    value = field_value(row, field)
    if not isinstance(value, str):
        raise FieldProblem(field, f"expected a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise FieldProblem(field, "empty string")
    return value.strip()


def option_texts(values: Any, field: str) -> list[str]:
    """A validated list of 2..10 non-empty option strings, stripped."""
    if not isinstance(values, list) or not values:
        raise FieldProblem(field, f"expected a non-empty list of options, got {values!r}")
    if len(values) > MAX_OPTIONS:
        raise FieldProblem(field, f"{len(values)} options; at most {MAX_OPTIONS} (letters A-J) are supported")
    if len(values) < MIN_OPTIONS:
        raise FieldProblem(field, f"{len(values)} option; a multiple-choice item needs at least {MIN_OPTIONS}")
    for position, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise FieldProblem(field, f"option {position} is {value!r}, expected a non-empty string")
    return [value.strip() for value in values]


def class_index(row: Mapping[str, Any], field: str, count: int) -> int:
    """An int label in [0, count) given as an int or a digit string; -1 (unlabelled) is rejected."""
    value = field_value(row, field)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldProblem(field, f"expected an int label, got {value!r}")
    if value == -1:
        raise FieldProblem(field, "label -1 marks an unlabelled (test) row; it cannot be used for training or "
                                  "evaluation")
    if not 0 <= value < count:
        raise FieldProblem(field, f"label {value} is outside [0, {count})")
    return value


def qa_example(uid: str, instruction: str, stem: str, options: list[str], answer: int, blank_line: bool,
               category: Optional[str] = None) -> Example:
    """A QA Example in the shared layout."""
    return Example(
        uid=uid, prompt=multiple_choice_prompt(instruction, stem, options, blank_line),
        options=list(LETTERS[: len(options)]), answer=answer, category=category,
    )


def convert_row(spec: "TaskSpec", row: Mapping[str, Any], uid: str, origin: str, training: bool = False) -> Example:
    """One row as an Example, by the task's converter (``training``: a training prompt, which differs for
    MMLU-Pro); a MalformedRowError names ``origin`` (file and line) and the field."""
    try:
        return spec.converter(row, spec, uid, training)
    except FieldProblem as problem:
        raise MalformedRowError(
            f"{origin}: field {problem.field!r}: {problem.problem} (task {spec.name!r}; "
            "pass skip_bad_rows=True to skip such rows)"
        ) from None


def rows_to_examples(
    spec: "TaskSpec", rows: Sequence[Mapping[str, Any]], split: str, skip_bad_rows: bool = False,
    training: bool = False,
) -> tuple[list[Example], int]:
    """Examples of one split and how many malformed rows were skipped (always 0 unless
    ``skip_bad_rows``, in which case malformed rows are dropped instead of raising). ``training``
    marks the rows trained on (their prompts may differ, see `convert_row`)."""
    examples, skipped = [], 0
    for position, row in enumerate(rows, start=1):
        number = row.number if isinstance(row, SourceRow) else position
        origin = row.origin if isinstance(row, SourceRow) else f"task {spec.name} split {split} row {position}"
        try:
            examples.append(convert_row(spec, row, f"{spec.name}/{split}/{number}", origin, training))
        except MalformedRowError:
            if not skip_bad_rows:
                raise
            skipped += 1
    return examples, skipped
