"""Raw rows -> `Example`: the prompt text (no chat tokens) and the gold answer of each task.

Every prompt is the reference release's text, character for character (tests pin each one).
All multiple-choice tasks share one layout::

    {instruction}
    {stem}
    Options:
    A. {option 0}
    B. {option 1}
    (blank line: ARC-C, ARC-E, CSQA, OBQA only)
    Answer: (trailing space)

Instructions and stems (whitespace at both ends of every field is stripped; the reference keeps
it, which changes about 1% of MMLU-Pro's fields and no field of the other local data sets):

- ARC-C, ARC-E, CSQA: "Below is a multiple-choice question. Please choose the correct answer." /
  the question; a blank line before "Answer: ".
- OBQA: the same instruction / "Question: " + question_stem; a blank line before "Answer: ".
- MMLU-Pro: "Below is a multiple-choice question about {category}. Please choose the correct
  answer." with the category lower-cased and ``_`` turned into spaces, in selection and evaluation
  prompts; training prompts (``training=True``) say only "Below is a multiple-choice question.",
  as the reference's. No blank line.
- HellaSwag: "Choose the most plausible ending for the following context:" / "Context: " + ctx.
  No blank line.
- SWAG: "Choose the sentence that best completes the start phrase below:" /
  "start phrase: " + sent1 + " " + sent2 (HF's ``startphrase``), endings ending0..ending3. No
  blank line.

GLUE examples keep their raw sentences (CoLA one, RTE and MRPC two); how they are joined depends
on the chat format (see `labelled_sentences` and ``ChatFormat.sentence_separator``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from .rows import SourceRow
from .tasks import TaskSpec

__all__ = [
    "Example", "MalformedRowError", "LETTERS", "MAX_OPTIONS",
    "multiple_choice_prompt", "labelled_sentences", "convert_row", "rows_to_examples",
]

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J")
MAX_OPTIONS = len(LETTERS)
MIN_OPTIONS = 2
CHOOSE_ANSWER = "Please choose the correct answer."


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


class MalformedRowError(ValueError):
    """A row that cannot become an Example; the message names its file, line and field."""


class _FieldProblem(Exception):
    """Raised by converters; `convert_row` adds the row's location to it."""

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


def _value(row: Mapping[str, Any], field: str) -> Any:
    """The field's value; a missing or null field is a problem."""
    value = row.get(field)
    if value is None:
        raise _FieldProblem(field, "missing (absent or null)")
    return value


def _text(row: Mapping[str, Any], field: str, allow_empty: bool = False) -> str:
    """The field as a stripped string."""
    value = _value(row, field)
    if not isinstance(value, str):
        raise _FieldProblem(field, f"expected a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise _FieldProblem(field, "empty string")
    return value.strip()


def _option_texts(values: Any, field: str) -> list[str]:
    """A validated list of 2..10 non-empty option strings, stripped."""
    if not isinstance(values, list) or not values:
        raise _FieldProblem(field, f"expected a non-empty list of options, got {values!r}")
    if len(values) > MAX_OPTIONS:
        raise _FieldProblem(field, f"{len(values)} options; at most {MAX_OPTIONS} (letters A-J) are supported")
    if len(values) < MIN_OPTIONS:
        raise _FieldProblem(field, f"{len(values)} option; a multiple-choice item needs at least {MIN_OPTIONS}")
    for position, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise _FieldProblem(field, f"option {position} is {value!r}, expected a non-empty string")
    return [value.strip() for value in values]


def _class_index(row: Mapping[str, Any], field: str, count: int) -> int:
    """An int label in [0, count) given as an int or a digit string; -1 (unlabelled) is rejected."""
    value = _value(row, field)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldProblem(field, f"expected an int label, got {value!r}")
    if value == -1:
        raise _FieldProblem(field, "label -1 marks an unlabelled (test) row; it cannot be used for training or evaluation")
    if not 0 <= value < count:
        raise _FieldProblem(field, f"label {value} is outside [0, {count})")
    return value


def _qa_example(uid: str, instruction: str, stem: str, options: list[str], answer: int, blank_line: bool,
                category: Optional[str] = None) -> Example:
    """A QA Example in the shared layout."""
    return Example(
        uid=uid, prompt=multiple_choice_prompt(instruction, stem, options, blank_line),
        options=list(LETTERS[: len(options)]), answer=answer, category=category,
    )


def _labelled_choices_converter(question_field: str, stem_prefix: str) -> Callable[..., Example]:
    """Converter for ARC / CSQA / OBQA rows: ``choices{text,label}`` and ``answerKey``.

    The answer is the position of ``answerKey`` in ``choices.label``, so ARC's numeric keys
    ("1".."5") map to letters by position; options are always lettered A, B, C, ...
    """

    def convert(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
        question = _text(row, question_field)
        choices = _value(row, "choices")
        if not isinstance(choices, Mapping):
            raise _FieldProblem("choices", f"expected an object with 'text' and 'label', got {choices!r}")
        options = _option_texts(choices.get("text"), "choices.text")
        labels = choices.get("label")
        if not isinstance(labels, list) or len(labels) != len(options):
            raise _FieldProblem("choices.label", f"expected {len(options)} labels (one per option), got {labels!r}")
        labels = [str(label).strip() for label in labels]
        key = str(_value(row, "answerKey")).strip()
        if key not in labels:
            raise _FieldProblem("answerKey", f"{key!r} is not one of the choice labels {labels}")
        return _qa_example(uid, f"Below is a multiple-choice question. {CHOOSE_ANSWER}",
                           stem_prefix + question, options, labels.index(key), blank_line=True)

    return convert


def _mmlu_pro(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
    """MMLU-Pro: ``question``, ``options`` (up to 10), ``answer_index``, ``category``.

    The gold answer is ``answer_index``, what the reference release scores against; the ``answer``
    letter is not read (it disagrees with ``answer_index`` in one test row, question_id 3983).
    Training prompts leave the category out of the instruction, as the reference's do.
    """
    question = _text(row, "question")
    options = _option_texts(_value(row, "options"), "options")
    answer = _class_index(row, "answer_index", len(options))
    category = _text(row, "category")
    about = "" if training else f" about {category.replace('_', ' ').lower()}"
    return _qa_example(uid, f"Below is a multiple-choice question{about}. {CHOOSE_ANSWER}",
                       question, options, answer, blank_line=False, category=category)


def _hellaswag(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
    """HellaSwag: ``ctx``, ``endings``, ``label`` (int or digit string)."""
    context = _text(row, "ctx")
    options = _option_texts(_value(row, "endings"), "endings")
    answer = _class_index(row, "label", len(options))
    return _qa_example(uid, "Choose the most plausible ending for the following context:",
                       f"Context: {context}", options, answer, blank_line=False)


def _swag(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
    """SWAG (HF allenai/swag regular): ``sent1``, ``sent2``, ``ending0..ending3``, ``label``."""
    start = " ".join(part for part in (_text(row, "sent1"), _text(row, "sent2", allow_empty=True)) if part)
    endings = [_text(row, f"ending{position}") for position in range(4)]
    answer = _class_index(row, "label", len(endings))
    return _qa_example(uid, "Choose the sentence that best completes the start phrase below:",
                       f"start phrase: {start}", endings, answer, blank_line=False)


def _single_sentence(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
    """CoLA: ``sentence``, ``label``."""
    sentences = (_text(row, "sentence"),)
    return Example(uid=uid, sentences=sentences, label=_class_index(row, "label", spec.num_labels or 0))


def _sentence_pair(row: Mapping[str, Any], spec: TaskSpec, uid: str, training: bool) -> Example:
    """RTE / MRPC: ``sentence1``, ``sentence2``, ``label``."""
    sentences = (_text(row, "sentence1"), _text(row, "sentence2"))
    return Example(uid=uid, sentences=sentences, label=_class_index(row, "label", spec.num_labels or 0))


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], TaskSpec, str, bool], Example]] = {
    "arc_c": _labelled_choices_converter("question", ""),
    "arc_e": _labelled_choices_converter("question", ""),
    "csqa": _labelled_choices_converter("question", ""),
    "obqa": _labelled_choices_converter("question_stem", "Question: "),
    "hellaswag": _hellaswag,
    "swag": _swag,
    "mmlu_pro": _mmlu_pro,
    "cola": _single_sentence,
    "rte": _sentence_pair,
    "mrpc": _sentence_pair,
}


def convert_row(spec: TaskSpec, row: Mapping[str, Any], uid: str, origin: str, training: bool = False) -> Example:
    """One row as an Example (``training``: a training prompt, which differs for MMLU-Pro); a
    MalformedRowError names ``origin`` (file and line) and the field."""
    if spec.name not in _CONVERTERS:
        raise ValueError(f"task {spec.name!r} has no row converter; known: {', '.join(_CONVERTERS)}")
    try:
        return _CONVERTERS[spec.name](row, spec, uid, training)
    except _FieldProblem as problem:
        raise MalformedRowError(
            f"{origin}: field {problem.field!r}: {problem.problem} (task {spec.name!r}; "
            "pass skip_bad_rows=True to skip such rows)"
        ) from None


def rows_to_examples(
    spec: TaskSpec, rows: Sequence[Mapping[str, Any]], split: str, skip_bad_rows: bool = False,
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
