"""Chat wrappers put around a task prompt: ``prefix + prompt + suffix``, then answer + ``answer_end``.

Which format a model gets (``chat_format`` in its model file):

- Base checkpoints (Llama-3.2-1B/3B, Llama-3.1-8B) get "reference_llama3": the LD-MoLE reference
  release's exact input, the raw prompt behind <|begin_of_text|> with no chat turn. A base model
  never saw the header/eot tokens of Llama-3's chat template, so wrapping it in them would make
  fine-tuning start from tokens whose embeddings are untrained.
- Post-trained / instruction-tuned checkpoints get their own chat template, reproduced exactly
  (tests compare with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``):
  "qwen3" (Qwen3-0.6B / Qwen3-1.7B, the hybrid-thinking checkpoints the reference and the paper
  use, in non-thinking mode), "smollm2" (SmolLM2-Instruct, including the default system turn its
  template adds when no system message is given), "llama3" (Llama-3 Instruct), "chatml" (bare
  ChatML, e.g. Qwen2.5). "reference_qwen3" reproduces what the reference fed Qwen3 instead
  (<|im_start|> glued to the raw prompt, no role and no turn structure), for exact replication.
- "plain": the raw prompt, the tokenizer's own BOS, the answer closed with its eos.

Decisions:

- Only a user turn, no system turn of our own. Llama-3.2's template would add a dated system
  header ("Cutting Knowledge Date ... Today Date ...") that changes with the day the data is built,
  so "llama3" leaves it out (the only format that is not the template's exact output).
  SmolLM2's template adds a fixed system turn by itself; "smollm2" keeps it, since that is the
  text the instruct model was trained and is prompted with.
- Never a doubled BOS: chat prefixes hold no BOS and the tokenizer adds its own (Llama-3 adds
  <|begin_of_text|> with ``add_special_tokens=True``; Qwen3 and SmolLM2 add nothing). The reference
  formats spell their start token out in ``prefix`` and skip the tokenizer's (``tokenizer_bos``).
- "qwen3" ends the generation prompt with the empty think block, exactly what Qwen3's template
  renders with ``enable_thinking=False`` both for the generation prompt and for a trained assistant
  turn; the answer letter follows the block.
- Chat formats send the prompt trimmed (``str.strip``) as the user message: Llama-3's template
  trims it (``content | trim``), which drops the trailing space of "Answer: ", and the other chat
  formats get the same text, so every encoding equals ``apply_chat_template`` on the trimmed
  prompt. "plain" and the reference formats keep "Answer: " as is, so the letter follows the space
  as in the reference release.
- GLUE: chat formats and "plain" send the labelled lines of `examples.labelled_sentences` as the
  user text. The reference formats reproduce the reference's classification input instead: the raw
  sentences joined by a separator token and closed by ``answer_end``, with no start token at all
  (the reference tokenizes GLUE inputs without special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...core.suggest import did_you_mean

__all__ = ["ChatFormat", "CHAT_FORMATS", "get_chat_format"]

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class ChatFormat:
    """A single-turn chat wrapper. ``answer_end`` closes the assistant turn after the answer
    letter (None: the tokenizer's eos token); ``trim_user_text`` strips the prompt's outer
    whitespace before wrapping, as chat templates do; ``tokenizer_bos`` puts the tokenizer's own
    leading specials (BOS) in front; ``sentence_separator`` (reference formats) switches GLUE
    inputs to the raw sentences joined by that token instead of the wrapped labelled lines."""

    name: str
    prefix: str
    suffix: str
    answer_end: Optional[str]
    trim_user_text: bool = True
    tokenizer_bos: bool = True
    sentence_separator: Optional[str] = None

    def user_text(self, prompt: str) -> str:
        """The text placed between ``prefix`` and ``suffix`` for this prompt."""
        return prompt.strip() if self.trim_user_text else prompt


CHAT_FORMATS: dict[str, ChatFormat] = {
    fmt.name: fmt
    for fmt in (
        ChatFormat(
            name="qwen3",
            prefix="<|im_start|>user\n",
            suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            answer_end="<|im_end|>",
        ),
        ChatFormat(
            name="llama3",
            prefix="<|start_header_id|>user<|end_header_id|>\n\n",
            suffix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            answer_end="<|eot_id|>",
        ),
        ChatFormat(
            name="smollm2",
            prefix=f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n",
            suffix="<|im_end|>\n<|im_start|>assistant\n",
            answer_end="<|im_end|>",
        ),
        ChatFormat(
            name="chatml",
            prefix="<|im_start|>user\n",
            suffix="<|im_end|>\n<|im_start|>assistant\n",
            answer_end="<|im_end|>",
        ),
        ChatFormat(name="plain", prefix="", suffix="", answer_end=None, trim_user_text=False),
        # The reference release: QA is start token + raw prompt, target letter + end token; GLUE is
        # sentence1 [+ separator + sentence2] + end token. Llama's end is the base checkpoints' eos.
        ChatFormat(
            name="reference_llama3", prefix="<|begin_of_text|>", suffix="", answer_end="<|end_of_text|>",
            trim_user_text=False, tokenizer_bos=False, sentence_separator="<|end_of_text|>",
        ),
        ChatFormat(
            name="reference_qwen3", prefix="<|im_start|>", suffix="", answer_end="<|im_end|>",
            trim_user_text=False, tokenizer_bos=False, sentence_separator="<|endoftext|>",
        ),
    )
}


def get_chat_format(name: str) -> ChatFormat:
    """The built-in chat format called ``name``; a ValueError lists the valid names otherwise."""
    if name in CHAT_FORMATS:
        return CHAT_FORMATS[name]
    raise ValueError(
        f"unknown chat format {name!r}{did_you_mean(name, CHAT_FORMATS)}; set chat_format= (in the model "
        f"file or on the command line) to one of: {', '.join(CHAT_FORMATS)}"
    )
