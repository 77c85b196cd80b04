"""Chat wrappers put around a task prompt: ``prefix + prompt + suffix``, then answer + ``answer_end``.

Decisions (checked against the tokenizers' own chat templates, see tests/test_data_features.py):

- Only a user turn, no system turn. Llama-3.2's template would add a dated system header
  ("Cutting Knowledge Date ... Today Date ...") that changes with the day the data is built.
- No BOS in any prefix: the tokenizer adds it (Llama-3 adds <|begin_of_text|> with
  ``add_special_tokens=True``; Qwen3 adds nothing), so it is never doubled.
- "qwen3" ends the generation prompt with the empty think block, exactly what Qwen3's template
  renders with ``enable_thinking=False`` both for the generation prompt and for a trained assistant
  turn; the answer letter follows the block. "chatml" is the same ChatML without the think block
  (SmolLM2-Instruct, Qwen2.5, or Qwen3 without the non-thinking marker).
- Chat formats send the prompt trimmed (``str.strip``) as the user message: Llama-3's template
  trims it (``content | trim``), which drops the trailing space of "Answer: ", and Qwen3 gets the
  same text, so both encodings equal ``apply_chat_template`` on the trimmed prompt. "plain" keeps
  "Answer: " as is, so the letter follows the space as in the reference release.
- The reference release used no chat turn at all (``<|im_start|>`` or ``<|begin_of_text|>`` glued
  to the prompt, target letter + ``<|im_end|>`` / eos); "plain" is the closest to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..suggest import did_you_mean

__all__ = ["ChatFormat", "CHAT_FORMATS", "get_chat_format"]


@dataclass(frozen=True)
class ChatFormat:
    """A single-turn chat wrapper. ``answer_end`` closes the assistant turn after the answer
    letter (None: the tokenizer's eos token); ``trim_user_text`` strips the prompt's outer
    whitespace before wrapping, as chat templates do."""

    name: str
    prefix: str
    suffix: str
    answer_end: Optional[str]
    trim_user_text: bool = True

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
            name="chatml",
            prefix="<|im_start|>user\n",
            suffix="<|im_end|>\n<|im_start|>assistant\n",
            answer_end="<|im_end|>",
        ),
        ChatFormat(name="plain", prefix="", suffix="", answer_end=None, trim_user_text=False),
    )
}


def get_chat_format(name: str) -> ChatFormat:
    """The built-in chat format called ``name``; a ValueError lists the valid names otherwise."""
    if name in CHAT_FORMATS:
        return CHAT_FORMATS[name]
    raise ValueError(f"unknown chat format {name!r}{did_you_mean(name, CHAT_FORMATS)}; valid formats: {', '.join(CHAT_FORMATS)}")
