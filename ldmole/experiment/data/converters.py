"""The built-in tasks' row converters: the prompt text (no chat tokens) and the gold answer of each.

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

from typing import TYPE_CHECKING, Any, Callable, Mapping

from .examples import (Example, FieldProblem, class_index, field_value, option_texts, qa_example,
                       text_field)

if TYPE_CHECKING:
    from .tasks import TaskSpec

__all__ = ["labelled_choices_converter", "mmlu_pro_example", "hellaswag_example", "swag_example",
           "single_sentence_example", "sentence_pair_example"]

CHOOSE_ANSWER = "Please choose the correct answer."


def labelled_choices_converter(question_field: str, stem_prefix: str) -> Callable[..., Example]:
    """Converter for ARC / CSQA / OBQA rows: ``choices{text,label}`` and ``answerKey``.

    The answer is the position of ``answerKey`` in ``choices.label``, so ARC's numeric keys
    ("1".."5") map to letters by position; options are always lettered A, B, C, ...
    """

    def convert(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
        question = text_field(row, question_field)
        choices = field_value(row, "choices")
        if not isinstance(choices, Mapping):
            raise FieldProblem("choices", f"expected an object with 'text' and 'label', got {choices!r}")
        options = option_texts(choices.get("text"), "choices.text")
        labels = choices.get("label")
        if not isinstance(labels, list) or len(labels) != len(options):
            raise FieldProblem("choices.label", f"expected {len(options)} labels (one per option), got {labels!r}")
        labels = [str(label).strip() for label in labels]
        key = str(field_value(row, "answerKey")).strip()
        if key not in labels:
            raise FieldProblem("answerKey", f"{key!r} is not one of the choice labels {labels}")
        return qa_example(uid, f"Below is a multiple-choice question. {CHOOSE_ANSWER}",
                          stem_prefix + question, options, labels.index(key), blank_line=True)

    return convert


def mmlu_pro_example(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
    """MMLU-Pro: ``question``, ``options`` (up to 10), ``answer_index``, ``category``.

    The gold answer is ``answer_index``, what the reference release scores against; the ``answer``
    letter is not read (it disagrees with ``answer_index`` in one test row, question_id 3983).
    Training prompts leave the category out of the instruction, as the reference's do.
    """
    question = text_field(row, "question")
    options = option_texts(field_value(row, "options"), "options")
    answer = class_index(row, "answer_index", len(options))
    category = text_field(row, "category")
    about = "" if training else f" about {category.replace('_', ' ').lower()}"
    return qa_example(uid, f"Below is a multiple-choice question{about}. {CHOOSE_ANSWER}",
                      question, options, answer, blank_line=False, category=category)


def hellaswag_example(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
    """HellaSwag: ``ctx``, ``endings``, ``label`` (int or digit string)."""
    context = text_field(row, "ctx")
    options = option_texts(field_value(row, "endings"), "endings")
    answer = class_index(row, "label", len(options))
    return qa_example(uid, "Choose the most plausible ending for the following context:",
                      f"Context: {context}", options, answer, blank_line=False)


def swag_example(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
    """SWAG (HF allenai/swag regular): ``sent1``, ``sent2``, ``ending0..ending3``, ``label``."""
    start = " ".join(part for part in (text_field(row, "sent1"), text_field(row, "sent2", allow_empty=True)) if part)
    endings = [text_field(row, f"ending{position}") for position in range(4)]
    answer = class_index(row, "label", len(endings))
    return qa_example(uid, "Choose the sentence that best completes the start phrase below:",
                      f"start phrase: {start}", endings, answer, blank_line=False)


def single_sentence_example(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
    """CoLA: ``sentence``, ``label``."""
    sentences = (text_field(row, "sentence"),)
    return Example(uid=uid, sentences=sentences, label=class_index(row, "label", spec.num_labels or 0))


def sentence_pair_example(row: Mapping[str, Any], spec: "TaskSpec", uid: str, training: bool) -> Example:
    """RTE / MRPC: ``sentence1``, ``sentence2``, ``label``."""
    sentences = (text_field(row, "sentence1"), text_field(row, "sentence2"))
    return Example(uid=uid, sentences=sentences, label=class_index(row, "label", spec.num_labels or 0))
