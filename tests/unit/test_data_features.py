"""Token features with the real Qwen3, Llama-3 and SmolLM2 tokenizers, chat formats, and batch collation."""

from __future__ import annotations

import pytest
import torch

from ldmole.experiment.data import (
    CHAT_FORMATS, Example, collate, encode_classification, encode_qa, get_chat_format, letter_token_ids,
    pad_token_id_for,
)
from ldmole.experiment.data.examples import multiple_choice_prompt
from tests.helpers import REPO_ROOT, SHARED_DATA

MODEL_FAMILIES = ["qwen3", "llama3"]  # tokenizer folder name == chat format name
LETTERS = list("ABCDEFGHIJ")


@pytest.fixture(scope="module")
def tokenizers():
    """The shared Qwen3 and Llama-3 tokenizers, loaded once for this module."""
    folders = {name: SHARED_DATA / "tokenizers" / name for name in MODEL_FAMILIES}
    missing = [str(path) for path in folders.values() if not (path / "tokenizer.json").is_file()]
    if missing:
        pytest.skip(f"tokenizers not found: {missing} (set LDMOLE_DATA_DIR)")
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in folders.items()}


def qa_example(uid: str = "arc_c/train/1", options: int = 4, answer: int = 1, question: str = "Which is hot?") -> Example:
    """A QA example with ``options`` options and gold ``answer``."""
    texts = [f"choice {i}" for i in range(options)]
    prompt = multiple_choice_prompt(
        "Below is a multiple-choice question. Please choose the correct answer.", question, texts, blank_line=True
    )
    return Example(uid=uid, prompt=prompt, options=LETTERS[:options], answer=answer)


# ---- chat formats -------------------------------------------------------------------------


def test_unknown_chat_format_names_the_key_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'qwen'.*did you mean 'qwen3'.*set chat_format=.*qwen3, llama3, smollm2"):
        get_chat_format("qwen")
    assert set(CHAT_FORMATS) == {"qwen3", "llama3", "smollm2", "chatml", "plain", "reference_llama3", "reference_qwen3"}


def test_qwen3_format_is_the_non_thinking_chat_template(tokenizers):
    tokenizer, fmt, prompt = tokenizers["qwen3"], CHAT_FORMATS["qwen3"], qa_example().prompt.strip()
    user = [{"role": "user", "content": prompt}]
    generation = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert generation == fmt.prefix + prompt + fmt.suffix
    trained = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": "B"}], tokenize=False, enable_thinking=False
    )
    assert trained == fmt.prefix + prompt + fmt.suffix + "B" + fmt.answer_end + "\n"


def test_llama3_format_is_the_chat_template_without_system_turn(tokenizers):
    tokenizer, fmt, prompt = tokenizers["llama3"], CHAT_FORMATS["llama3"], qa_example().prompt.strip()
    user = [{"role": "user", "content": prompt}]
    generation = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert generation.startswith(tokenizer.bos_token) and generation.endswith(fmt.prefix + prompt + fmt.suffix)
    trained = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "B"}], tokenize=False)
    assert trained.endswith(fmt.suffix + "B" + fmt.answer_end)


def template_ids(tokenizer, prompt: str, **kwargs) -> list[int]:
    """Token ids of the tokenizer's own chat template for one user turn plus the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(features: dict) -> list[int]:
    """The prompt part of `encode_qa` features (everything before the answer letter)."""
    return features["input_ids"][: features["prompt_length"]]


def test_qwen3_encoding_is_the_templates_token_ids(tokenizers):
    tokenizer, example = tokenizers["qwen3"], qa_example()
    features = encode_qa(example, tokenizer, CHAT_FORMATS["qwen3"], max_length=1024)
    assert prompt_ids(features) == template_ids(tokenizer, example.prompt.strip(), enable_thinking=False)


def test_llama3_encoding_is_the_templates_token_ids_without_the_dated_system_turn(tokenizers):
    tokenizer, example = tokenizers["llama3"], qa_example()
    text = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    system_end = text.index("<|eot_id|>") + len("<|eot_id|>")
    assert "Today Date" in text[:system_end]
    expected = tokenizer.encode(tokenizer.bos_token + text[system_end:], add_special_tokens=False)
    assert prompt_ids(encode_qa(example, tokenizer, CHAT_FORMATS["llama3"], max_length=1024)) == expected


# ---- reference formats ---------------------------------------------------------------------

REFERENCE_TOKENS = {  # format -> (tokenizer family, start token, end token, GLUE separator)
    "reference_llama3": ("llama3", "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>"),
    "reference_qwen3": ("qwen3", "<|im_start|>", "<|im_end|>", "<|endoftext|>"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_TOKENS))
def test_reference_qa_is_start_token_raw_prompt_letter_and_end(tokenizers, name):
    family, start, end, _ = REFERENCE_TOKENS[name]
    tokenizer, example = tokenizers[family], qa_example()
    features = encode_qa(example, tokenizer, CHAT_FORMATS[name], max_length=1024)
    # The reference tokenizes (start + prompt, letter + end) as a pair without special tokens.
    pair = tokenizer(start + example.prompt, "B" + end, add_special_tokens=False)["input_ids"]
    assert features["input_ids"] == pair
    assert tokenizer.decode(prompt_ids(features)) == start + example.prompt
    assert example.prompt.endswith("\n\nAnswer: ")
    assert tokenizer.decode([t for t in features["labels"] if t != -100]) == "B" + end
    assert features["input_ids"].count(tokenizer.convert_tokens_to_ids(start)) == 1, "start token not doubled"


@pytest.mark.parametrize("name", sorted(REFERENCE_TOKENS))
def test_reference_classification_joins_raw_sentences_with_the_separator(tokenizers, name):
    family, _, end, separator = REFERENCE_TOKENS[name]
    tokenizer, fmt = tokenizers[family], CHAT_FORMATS[name]
    pair = encode_classification(Example(uid="rte/validation/1", sentences=("A dog runs.", "An animal moves."), label=0),
                                 tokenizer, fmt, max_length=512)
    expected = "A dog runs." + separator + "An animal moves." + end
    assert pair["input_ids"] == tokenizer.encode(expected, add_special_tokens=False)
    single = encode_classification(Example(uid="cola/validation/1", sentences=("Fine.",), label=1), tokenizer, fmt, 512)
    assert tokenizer.decode(single["input_ids"]) == "Fine." + end


def test_reference_format_of_another_family_is_rejected(tokenizers):
    with pytest.raises(ValueError, match=r"'reference_llama3' does not fit this tokenizer.*set chat_format="):
        encode_qa(qa_example(), tokenizers["qwen3"], CHAT_FORMATS["reference_llama3"], max_length=1024)


# ---- option letters -----------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_letter_variants_are_distinct_single_tokens_that_decode_to_the_letter(tokenizers, family):
    tokenizer = tokenizers[family]
    ids = letter_token_ids(tokenizer, LETTERS)
    for letter, variants in ids.items():
        assert len(variants) == 2, f"{family} {letter}: expected 'X' and ' X' as two tokens, got {variants}"
        assert [tokenizer.decode([v]) for v in variants] == [letter, f" {letter}"]
    flat = [v for variants in ids.values() for v in variants]
    assert len(set(flat)) == len(flat)


class TwoTokenLetters:
    """A stand-in tokenizer that splits every text into two ids."""

    def encode(self, text, add_special_tokens=False):
        return [1, 2]


def test_multi_token_letters_are_an_error():
    with pytest.raises(ValueError, match=r"'A' is 2 tokens"):
        letter_token_ids(TwoTokenLetters(), ["A"])


# ---- encode_qa ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_encode_qa_supervises_only_the_letter_and_end_marker(tokenizers, family):
    tokenizer, fmt = tokenizers[family], CHAT_FORMATS[family]
    features = encode_qa(qa_example(answer=2), tokenizer, fmt, max_length=1024)
    supervised = [t for t in features["labels"] if t != -100]
    assert tokenizer.decode(supervised) == "C" + fmt.answer_end
    start = features["prompt_length"]
    assert features["labels"][:start] == [-100] * start
    assert features["labels"][start:] == features["input_ids"][start:]
    assert features["input_ids"][start] in features["option_token_ids"][2], "letter must follow the prompt"
    assert tokenizer.decode(features["input_ids"][:start]).endswith(fmt.suffix)
    assert (features["answer"], features["category"], len(features["option_token_ids"])) == (2, None, 4)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_encode_qa_equals_tokenizing_the_joined_text_with_one_bos(tokenizers, family):
    tokenizer, fmt = tokenizers[family], CHAT_FORMATS[family]
    example = qa_example()
    features = encode_qa(example, tokenizer, fmt, max_length=1024)
    joined = fmt.prefix + example.prompt.strip() + fmt.suffix + "B" + fmt.answer_end
    assert features["input_ids"] == tokenizer(joined, add_special_tokens=True)["input_ids"]
    bos_count = features["input_ids"].count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 0
    assert bos_count == (1 if family == "llama3" else 0)


def test_plain_format_ends_the_answer_with_eos(tokenizers):
    tokenizer = tokenizers["llama3"]
    features = encode_qa(qa_example(), tokenizer, CHAT_FORMATS["plain"], max_length=1024)
    assert tokenizer.decode([t for t in features["labels"] if t != -100]) == "B" + tokenizer.eos_token
    assert tokenizer.decode(features["input_ids"][: features["prompt_length"]]).endswith("\n\nAnswer: ")


def test_chat_format_of_another_family_is_rejected(tokenizers):
    with pytest.raises(ValueError, match=r"'qwen3' does not fit this tokenizer"):
        encode_qa(qa_example(), tokenizers["llama3"], CHAT_FORMATS["qwen3"], max_length=1024)


def test_too_long_example_error_names_uid_length_and_fix(tokenizers):
    tokenizer, fmt = tokenizers["qwen3"], CHAT_FORMATS["qwen3"]
    example = qa_example(uid="mmlu_pro/test/42", question="word " * 200)
    length = len(encode_qa(example, tokenizer, fmt, max_length=4096)["input_ids"])
    with pytest.raises(ValueError) as caught:
        encode_qa(example, tokenizer, fmt, max_length=64)
    message = str(caught.value)
    for part in ("mmlu_pro/test/42", f"{length} tokens", "max_length=64", "truncate_long=true"):
        assert part in message, message


def test_truncation_drops_the_start_of_the_prompt_and_keeps_suffix_and_answer(tokenizers):
    tokenizer, fmt = tokenizers["qwen3"], CHAT_FORMATS["qwen3"]
    example = qa_example(question="word " * 200)
    full = encode_qa(example, tokenizer, fmt, max_length=4096)
    cut = encode_qa(example, tokenizer, fmt, max_length=64, truncate=True)
    assert len(cut["input_ids"]) == 64
    prefix_length = len(tokenizer.encode(fmt.prefix, add_special_tokens=False))
    assert cut["input_ids"][:prefix_length] == full["input_ids"][:prefix_length]
    assert cut["input_ids"][prefix_length:] == full["input_ids"][-(64 - prefix_length):]
    assert tokenizer.decode([t for t in cut["labels"] if t != -100]) == "B<|im_end|>"
    assert cut["prompt_length"] == 62


# ---- encode_classification ----------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_classification_sequence_ends_with_the_chat_suffix(tokenizers, family):
    tokenizer, fmt = tokenizers[family], CHAT_FORMATS[family]
    example = Example(uid="rte/validation/1", sentences=("A dog runs.", "An animal moves."), label=0)
    features = encode_classification(example, tokenizer, fmt, max_length=512)
    text = "Sentence 1: A dog runs.\nSentence 2: An animal moves."
    assert tokenizer.decode(features["input_ids"]) == (tokenizer.bos_token or "") + fmt.prefix + text + fmt.suffix
    assert features["label"] == 0


def test_plain_classification_ends_with_eos(tokenizers):
    tokenizer = tokenizers["qwen3"]
    features = encode_classification(Example(uid="u", sentences=("Fine.",), label=1), tokenizer,
                                     CHAT_FORMATS["plain"], max_length=512)
    assert tokenizer.decode(features["input_ids"]) == "Sentence: Fine." + tokenizer.eos_token


def test_pad_token_falls_back_to_eos(tokenizers):
    assert pad_token_id_for(tokenizers["qwen3"]) == tokenizers["qwen3"].pad_token_id
    assert tokenizers["llama3"].pad_token_id is None
    assert pad_token_id_for(tokenizers["llama3"]) == tokenizers["llama3"].eos_token_id


# ---- collate ------------------------------------------------------------------------------

SHORT = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "prompt_length": 2,
         "option_token_ids": [[7, 17], [9, 19], [11]], "answer": 0, "category": "math", "uid": "a"}
LONG = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, 5, 6], "prompt_length": 4,
        "option_token_ids": [[7, 17], [9, 19], [11, 21], [13, 23], [15, 25]], "answer": 4, "category": None,
        "uid": "b"}


def test_collate_right_padding():
    batch = collate([SHORT, LONG], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, -100], [-100] * 4 + [5, 6]]
    assert batch["last_prompt_index"].tolist() == [1, 3]
    assert batch["sequence_lengths"].tolist() == [4, 6]
    assert batch["answer"].tolist() == [0, 4]
    assert batch["category"] == ["math", None] and batch["uid"] == ["a", "b"]


def test_collate_left_padding_shifts_the_last_prompt_index():
    batch = collate([SHORT, LONG], pad_token_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 7, 8], [-100] * 4 + [5, 6]]
    assert batch["last_prompt_index"].tolist() == [3, 3]
    rows = torch.arange(2)
    assert batch["input_ids"][rows, batch["last_prompt_index"]].tolist() == [6, 4]


def test_collate_pads_option_ids_with_minus_one_and_masks_missing_options():
    batch = collate([SHORT, LONG], pad_token_id=0)
    assert batch["option_token_ids"].shape == (2, 5, 2)
    assert batch["option_token_ids"][0].tolist() == [[7, 17], [9, 19], [11, -1], [-1, -1], [-1, -1]]
    assert batch["option_mask"].tolist() == [[True, True, True, False, False], [True] * 5]


def test_collate_classification_batch():
    batch = collate([{"input_ids": [4, 5], "label": 1, "uid": "x"}, {"input_ids": [1, 2, 3], "label": 0, "uid": "y"}],
                    pad_token_id=9, padding_side="left")
    assert batch["input_ids"].tolist() == [[9, 4, 5], [1, 2, 3]]
    assert batch["label"].tolist() == [1, 0]
    assert batch["last_token_index"].tolist() == [2, 2]
    assert "labels" not in batch


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collated_real_features_score_at_the_position_before_the_letter(tokenizers, padding_side):
    tokenizer, fmt = tokenizers["llama3"], CHAT_FORMATS["llama3"]
    features = [encode_qa(qa_example(options=3, answer=2), tokenizer, fmt, 1024),
                encode_qa(qa_example(options=5, answer=4, question="A much longer question " * 5), tokenizer, fmt, 1024)]
    batch = collate(features, pad_token_id_for(tokenizer), padding_side=padding_side)
    rows = torch.arange(2)
    letters = batch["input_ids"][rows, batch["last_prompt_index"] + 1]
    gold = batch["option_token_ids"][rows, batch["answer"], 0]
    assert letters.tolist() == gold.tolist()
    assert tokenizer.decode(letters.tolist()) == "CE"


# ---- model files ----------------------------------------------------------------------------


@pytest.mark.parametrize("model, source, chat_format", [
    ("llama3.2_1b", "meta-llama/Llama-3.2-1B", "reference_llama3"),
    ("llama3.2_3b", "meta-llama/Llama-3.2-3B", "reference_llama3"),
    ("llama3.1_8b", "meta-llama/Llama-3.1-8B", "reference_llama3"),
    ("qwen3_0.6b", "Qwen/Qwen3-0.6B", "qwen3"),
    ("qwen3_1.7b", "Qwen/Qwen3-1.7B", "qwen3"),
    ("smollm2_135m", "offline:smollm2_135m", "smollm2"),
])
def test_model_files_pick_the_format_of_their_checkpoint(model, source, chat_format):
    import yaml

    config = yaml.safe_load((REPO_ROOT / "configs" / "models" / f"{model}.yaml").read_text())
    assert (config["model_source"], config["chat_format"]) == (source, chat_format)
    get_chat_format(config["chat_format"])


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize("format_name", ["own", "plain"])
def test_encode_prompt_is_the_prompt_part_of_a_qa_encoding(tokenizers, family, format_name):
    from ldmole.experiment.data import encode_prompt

    tokenizer, example = tokenizers[family], qa_example()
    fmt = CHAT_FORMATS[family if format_name == "own" else "plain"]
    expected = prompt_ids(encode_qa(example, tokenizer, fmt, max_length=1024))
    assert encode_prompt(example.prompt, tokenizer, fmt) == expected
