"""Rows -> Examples: the exact prompt of every task, answer mapping, and malformed-row errors."""

from __future__ import annotations

import pytest

from ldmole.experiment.data import TASKS, Example, get_task
from ldmole.experiment.data.examples import MalformedRowError, convert_row, labelled_sentences, rows_to_examples
from ldmole.experiment.data.rows import SourceRow

MC_HEADER = "Below is a multiple-choice question. Please choose the correct answer.\n"


def convert(task: str, row: dict, training: bool = False) -> Example:
    """Convert one hand-written row of ``task`` (as an evaluation row unless ``training``)."""
    return convert_row(get_task(task), row, uid=f"{task}/test/1", origin="hand-written row", training=training)


def arc_row(labels: list[str], answer_key: str, texts: list[str] | None = None) -> dict:
    """An ARC row whose options are 'opt0', 'opt1', ... unless ``texts`` is given."""
    texts = texts or [f"opt{i}" for i in range(len(labels))]
    return {"id": "x", "question": "Which is hot?", "choices": {"text": texts, "label": labels}, "answerKey": answer_key}


# ---- golden prompts, one per task ---------------------------------------------------------


@pytest.mark.parametrize("task", ["arc_c", "arc_e"])
def test_arc_prompt_is_the_reference_wording(task):
    example = convert(task, {
        "id": "Mercury_1", "question": "  Which is a source of heat? ",
        "choices": {"text": ["ice", "the Sun", "snow", "a cold drink"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    })
    assert example.prompt == (
        "Below is a multiple-choice question. Please choose the correct answer.\n"
        "Which is a source of heat?\n"
        "Options:\n"
        "A. ice\n"
        "B. the Sun\n"
        "C. snow\n"
        "D. a cold drink\n"
        "\n"
        "Answer: "
    )
    assert (example.options, example.answer, example.category) == (["A", "B", "C", "D"], 1, None)


def test_csqa_prompt_has_five_options():
    example = convert("csqa", {
        "id": None, "question": "Where do you keep milk?", "question_concept": None,
        "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["fridge", "oven", "car", "desk", "roof"]},
        "answerKey": "A",
    })
    assert example.prompt == (
        "Below is a multiple-choice question. Please choose the correct answer.\n"
        "Where do you keep milk?\n"
        "Options:\n"
        "A. fridge\nB. oven\nC. car\nD. desk\nE. roof\n"
        "\n"
        "Answer: "
    )
    assert (example.options, example.answer) == (["A", "B", "C", "D", "E"], 0)


def test_obqa_prompt_prefixes_the_stem_with_question():
    example = convert("obqa", {
        "id": "7-980", "question_stem": "The sun is responsible for",
        "choices": {"text": ["puppies", "aging", "wilting", "plants sprouting"], "label": ["A", "B", "C", "D"]},
        "answerKey": "D",
    })
    assert example.prompt == (
        "Below is a multiple-choice question. Please choose the correct answer.\n"
        "Question: The sun is responsible for\n"
        "Options:\n"
        "A. puppies\nB. aging\nC. wilting\nD. plants sprouting\n"
        "\n"
        "Answer: "
    )
    assert example.answer == 3


def test_hellaswag_prompt_asks_for_the_most_plausible_ending():
    example = convert("hellaswag", {
        "ind": 4, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he",
        "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
        "label": "3",
    })
    assert example.prompt == (
        "Choose the most plausible ending for the following context:\n"
        "Context: A man is sitting on a roof. he\n"
        "Options:\n"
        "A. is using wrap.\nB. is ripping tiles off.\nC. is holding a cube.\nD. starts pulling up roofing.\n"
        "Answer: "
    )
    assert (example.options, example.answer) == (["A", "B", "C", "D"], 3)


def test_swag_prompt_joins_sent1_and_sent2_into_the_start_phrase():
    example = convert("swag", {
        "video-id": "anetv_1", "fold-ind": "3", "startphrase": "Members walk down the street. A drum line",
        "sent1": "Members walk down the street.", "sent2": "A drum line", "gold-source": "gold",
        "ending0": "passes by playing.", "ending1": "has heard.", "ending2": "turns the lead.", "ending3": "dances.",
        "label": 0,
    })
    assert example.prompt == (
        "Choose the sentence that best completes the start phrase below:\n"
        "start phrase: Members walk down the street. A drum line\n"
        "Options:\n"
        "A. passes by playing.\nB. has heard.\nC. turns the lead.\nD. dances.\n"
        "Answer: "
    )
    assert example.answer == 0


MMLU_PRO_ROW = {
    "question_id": 70, "question": "What is 2 + 2?", "options": ["3", "4", "5"],
    "answer": "B", "answer_index": 1, "cot_content": "", "category": "computer_science", "src": "x",
}


def test_mmlu_pro_prompt_names_the_category_and_uses_answer_index():
    example = convert("mmlu_pro", MMLU_PRO_ROW)
    assert example.prompt == (
        "Below is a multiple-choice question about computer science. Please choose the correct answer.\n"
        "What is 2 + 2?\n"
        "Options:\n"
        "A. 3\nB. 4\nC. 5\n"
        "Answer: "
    )
    assert (example.options, example.answer, example.category) == (["A", "B", "C"], 1, "computer_science")


def test_mmlu_pro_training_prompt_has_no_category_as_in_the_reference():
    example = convert("mmlu_pro", MMLU_PRO_ROW, training=True)
    assert example.prompt == (
        "Below is a multiple-choice question. Please choose the correct answer.\n"
        "What is 2 + 2?\n"
        "Options:\n"
        "A. 3\nB. 4\nC. 5\n"
        "Answer: "
    )
    assert (example.answer, example.category) == (1, "computer_science")


@pytest.mark.parametrize("task", ["arc_c", "csqa", "obqa", "hellaswag", "swag", "cola", "rte"])
def test_training_rows_of_other_tasks_get_the_evaluation_prompt(task):
    rows = {
        "arc_c": arc_row(["A", "B"], "A"), "csqa": arc_row(["A", "B"], "A"),
        "obqa": {**arc_row(["A", "B"], "A"), "question_stem": "Q"},
        "hellaswag": {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 0},
        "swag": {"sent1": "s", "sent2": "t", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 1},
        "cola": {"sentence": "s", "label": 1}, "rte": {"sentence1": "a", "sentence2": "b", "label": 0},
    }
    assert convert(task, rows[task], training=True) == convert(task, rows[task])


def test_cola_example_keeps_the_raw_sentence():
    example = convert("cola", {"sentence": "The book was written by John.", "label": 1, "idx": 0})
    assert (example.sentences, example.label, example.prompt) == (("The book was written by John.",), 1, None)
    assert labelled_sentences(example.sentences) == "Sentence: The book was written by John."


@pytest.mark.parametrize("task", ["rte", "mrpc"])
def test_sentence_pair_example_keeps_both_raw_sentences(task):
    example = convert(task, {"sentence1": "A dog runs.", "sentence2": "An animal moves.", "label": 0, "idx": 3})
    assert (example.sentences, example.label) == (("A dog runs.", "An animal moves."), 0)
    assert labelled_sentences(example.sentences) == "Sentence 1: A dog runs.\nSentence 2: An animal moves."


def test_every_registered_task_has_a_converter():
    for name in TASKS:
        with pytest.raises(MalformedRowError):
            convert(name, {})


# ---- answer mapping and option counts -----------------------------------------------------


def test_arc_numeric_answer_keys_map_to_letters_by_position():
    example = convert("arc_c", arc_row(["1", "2", "3", "4"], "3"))
    assert example.options == ["A", "B", "C", "D"]
    assert example.answer == 2
    assert "\nC. opt2\n" in example.prompt


@pytest.mark.parametrize("count, key, expected", [(3, "C", 2), (5, "E", 4), (5, "5", 4)])
def test_arc_items_with_three_or_five_options(count, key, expected):
    labels = list("ABCDE"[:count]) if key.isalpha() else [str(i + 1) for i in range(count)]
    example = convert("arc_c", arc_row(labels, key))
    assert example.options == list("ABCDE"[:count])
    assert example.answer == expected
    assert example.prompt.endswith(f"{'ABCDE'[count - 1]}. opt{count - 1}\n\nAnswer: ")


def test_mmlu_pro_with_ten_options_uses_letters_a_to_j():
    example = convert("mmlu_pro", {
        "question": "Pick ten.", "options": [f"o{i}" for i in range(10)], "answer_index": 9, "category": "math",
    })
    assert example.options == list("ABCDEFGHIJ")
    assert example.answer == 9
    assert example.prompt.endswith("I. o8\nJ. o9\nAnswer: ")


def test_eleven_options_are_an_error():
    with pytest.raises(MalformedRowError, match=r"'options': 11 options; at most 10"):
        convert("mmlu_pro", {"question": "Q", "options": [f"o{i}" for i in range(11)], "answer_index": 0,
                             "category": "math"})
    with pytest.raises(MalformedRowError, match=r"'choices.text': 11 options"):
        convert("arc_c", arc_row([str(i) for i in range(11)], "1"))


# ---- malformed rows -----------------------------------------------------------------------


@pytest.mark.parametrize("task, row, field", [
    ("arc_c", {"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "answerKey"),
    ("arc_c", arc_row(["A", "B", "C"], "D"), "answerKey"),
    ("arc_c", {"question": "Q", "choices": {"text": [], "label": []}, "answerKey": "A"}, "choices.text"),
    ("arc_c", {"question": "Q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}, "choices.label"),
    ("obqa", {"question": "wrong field", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
     "question_stem"),
    ("mmlu_pro", {"question": "Q", "options": ["a", "b"], "answer_index": 2, "category": "math"}, "answer_index"),
    ("hellaswag", {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": ""}, "label"),
    ("swag", {"sent1": "s", "sent2": "t", "ending0": "a", "ending1": "b", "ending2": "c", "label": 1}, "ending3"),
    ("cola", {"sentence": "s", "label": 2}, "label"),
    ("rte", {"sentence1": "a", "sentence2": "b", "label": -1}, "label"),
    ("mrpc", {"sentence1": "a", "label": 0}, "sentence2"),
])
def test_malformed_row_error_names_origin_and_field(task, row, field):
    with pytest.raises(MalformedRowError) as caught:
        convert_row(get_task(task), row, uid="u", origin="/data/x/train.jsonl line 7")
    message = str(caught.value)
    assert "/data/x/train.jsonl line 7" in message and f"field {field!r}" in message, message


def test_unlabelled_glue_rows_are_rejected_with_the_reason():
    with pytest.raises(MalformedRowError, match="unlabelled"):
        convert("rte", {"sentence1": "a", "sentence2": "b", "label": -1})


def test_skip_bad_rows_skips_and_counts_them():
    good = {"sentence": "Fine.", "label": 1}
    rows = [SourceRow(good, "f.jsonl", "line", 1), SourceRow({"sentence": "x", "label": -1}, "f.jsonl", "line", 2),
            SourceRow(good, "f.jsonl", "line", 3), SourceRow({"label": 0}, "f.jsonl", "line", 4)]
    examples, skipped = rows_to_examples(get_task("cola"), rows, "train", skip_bad_rows=True)
    assert [e.uid for e in examples] == ["cola/train/1", "cola/train/3"]
    assert skipped == 2
    with pytest.raises(MalformedRowError, match="f.jsonl line 2: field 'label'"):
        rows_to_examples(get_task("cola"), rows, "train")
