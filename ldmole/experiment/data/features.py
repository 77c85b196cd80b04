"""Examples -> token features: the prompt, supervised answer and option-letter candidates of a QA
example, the sentences of a classification example, and the `FeatureEncoder` that applies a task
kind's encoding to a run's examples (padding them into batches: ``collation.py``).

A QA sequence is ``[tokenizer's own leading specials] + prefix + prompt + suffix + letter +
answer_end`` (the prompt trimmed for chat formats, see `ChatFormat.user_text`). Each piece is
tokenized on its own (``add_special_tokens=False``), so the prompt boundary is exact; this equals
tokenizing the joined string, because every boundary is a special token or a newline, and for the
reference formats it is exactly the reference release's tokenization (prompt and target tokenized
as a pair without special tokens). The leading specials are whatever the tokenizer adds in front
with ``add_special_tokens=True`` (Llama-3: <|begin_of_text|>, Qwen3 and SmolLM2: nothing); formats
with ``tokenizer_bos=False`` (the reference formats, whose prefix is the start token) skip them.

A classification sequence is the same wrapper around `labelled_sentences`, or for formats with a
``sentence_separator`` the reference's ``sentence1 [+ separator + sentence2] + answer_end`` with
no start token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .chat import ChatFormat
from .examples import Example, labelled_sentences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX", "letter_token_ids", "encode_qa", "encode_classification", "encode_prompt", "end_token_id",
    "pad_token_id_for", "FeatureEncoder",
]

IGNORE_INDEX = -100


def letter_token_ids(tokenizer: "PreTrainedTokenizerBase", letters: Sequence[str]) -> dict[str, list[int]]:
    """For each letter, the ids of its "A" and " A" variants (deduplicated, in that order).

    Raises ValueError when a variant is not exactly one token: scoring reads one logit per variant.
    """
    return {letter: list(ids) for letter, ids in zip(letters, _letter_variants(tokenizer, tuple(letters)))}


@lru_cache(maxsize=16)
def _letter_variants(tokenizer: "PreTrainedTokenizerBase", letters: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Cached body of `letter_token_ids` (encoding every example's letters again is slow)."""
    result = []
    for letter in letters:
        ids: list[int] = []
        for variant in (letter, f" {letter}"):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"option letter variant {variant!r} is {len(encoded)} tokens {encoded} in this tokenizer; "
                    "letter scoring needs each variant to be a single token"
                )
            if encoded[0] not in ids:
                ids.append(encoded[0])
        result.append(tuple(ids))
    return tuple(result)


@lru_cache(maxsize=16)
def _leading_special_ids(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, ...]:
    """The ids the tokenizer puts in front of a text with ``add_special_tokens=True`` (e.g. BOS)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def _ids(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Token ids of a text piece without any special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _head(tokenizer: "PreTrainedTokenizerBase", chat_format: ChatFormat) -> list[int]:
    """Ids in front of the user text: the tokenizer's leading specials (unless the format spells
    its own start token) and the format's prefix."""
    leading = list(_leading_special_ids(tokenizer)) if chat_format.tokenizer_bos else []
    return leading + _ids(tokenizer, chat_format.prefix)


def _special_id(tokenizer: "PreTrainedTokenizerBase", chat_format: ChatFormat, text: str, role: str) -> int:
    """The id of ``text``, which must be one token of this tokenizer (a special token)."""
    ids = _ids(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(
            f"chat format {chat_format.name!r} does not fit this tokenizer: its {role} {text!r} is "
            f"{len(ids)} tokens, not one special token; set chat_format= to the format of this model family"
        )
    return ids[0]


def end_token_id(tokenizer: "PreTrainedTokenizerBase", chat_format: ChatFormat) -> int:
    """The single token that closes the answer: the format's ``answer_end`` or the tokenizer eos."""
    text = chat_format.answer_end if chat_format.answer_end is not None else tokenizer.eos_token
    if text is None:
        raise ValueError(f"chat format {chat_format.name!r} ends answers with eos, but the tokenizer has no eos_token")
    return _special_id(tokenizer, chat_format, text, "end marker")


def _fit_body(uid: str, body: list[int], other_length: int, max_length: int, truncate: bool) -> list[int]:
    """The prompt body, cut from the left when the whole sequence exceeds ``max_length``."""
    total = len(body) + other_length
    if total <= max_length:
        return body
    if not truncate:
        raise ValueError(
            f"example {uid}: {total} tokens exceed max_length={max_length}; raise max_length= or set "
            "truncate_long=true (truncate=True) to drop tokens from the start of the prompt"
        )
    excess = total - max_length
    if excess >= len(body):
        raise ValueError(
            f"example {uid}: the chat wrapper and answer alone take {other_length} tokens, leaving no room "
            f"for the prompt within max_length={max_length}; raise max_length="
        )
    return body[excess:]


def encode_qa(
    example: Example,
    tokenizer: "PreTrainedTokenizerBase",
    chat_format: ChatFormat,
    max_length: int,
    truncate: bool = False,
) -> dict[str, Any]:
    """Token features of one QA example.

    Returns ``input_ids`` (prompt + answer letter + end marker), ``labels`` (-100 on the prompt,
    the letter and end-marker ids after it), ``prompt_length`` (position ``prompt_length - 1``
    predicts the letter), ``option_token_ids`` (per option letter, its "A"/" A" ids), ``answer``,
    ``category`` and ``uid``. Over-long sequences raise, or with ``truncate`` lose prompt tokens
    from the left (the start of the user text); chat suffix and answer are always kept.
    """
    if example.prompt is None or example.options is None or example.answer is None:
        raise ValueError(f"example {example.uid} is not a QA example (no prompt/options/answer)")
    options = letter_token_ids(tokenizer, example.options)
    head = _head(tokenizer, chat_format)
    tail = _ids(tokenizer, chat_format.suffix)
    answer_ids = [options[example.options[example.answer]][0], end_token_id(tokenizer, chat_format)]
    body = _fit_body(
        example.uid, _ids(tokenizer, chat_format.user_text(example.prompt)), len(head) + len(tail) + len(answer_ids),
        max_length, truncate
    )
    prompt_ids = head + body + tail
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_length": len(prompt_ids),
        "option_token_ids": [options[letter] for letter in example.options],
        "answer": example.answer,
        "category": example.category,
        "uid": example.uid,
    }


def encode_prompt(prompt: str, tokenizer: "PreTrainedTokenizerBase", chat_format: ChatFormat) -> list[int]:
    """Token ids of a free-text prompt wrapped as a QA prompt is (`encode_qa` without the answer):
    the tokenizer's leading specials, prefix, the user text and suffix, ready for generation."""
    return _head(tokenizer, chat_format) + _ids(tokenizer, chat_format.user_text(prompt)) + \
        _ids(tokenizer, chat_format.suffix)


def encode_classification(
    example: Example,
    tokenizer: "PreTrainedTokenizerBase",
    chat_format: ChatFormat,
    max_length: int,
    truncate: bool = False,
) -> dict[str, Any]:
    """Token features of one classification example: ``input_ids``, ``label``, ``uid``.

    Chat formats: prefix + labelled sentences + suffix, so the last token (read by the
    classification head) is always the fixed end of the chat suffix; the plain format, whose
    suffix is empty, ends with eos instead. Formats with a ``sentence_separator`` (the reference's
    layout): sentence1 [+ separator + sentence2] + ``answer_end``, no start token. Truncation works
    as in `encode_qa` (for a pair it cuts from the start of sentence 1 and may reach the separator).
    """
    if example.sentences is None or example.label is None:
        raise ValueError(f"example {example.uid} is not a classification example (no sentences/label)")
    end = [end_token_id(tokenizer, chat_format)]
    if chat_format.sentence_separator is not None:
        separator = [_special_id(tokenizer, chat_format, chat_format.sentence_separator, "sentence separator")]
        head: list[int] = []
        text_ids = _ids(tokenizer, example.sentences[0])
        for sentence in example.sentences[1:]:
            text_ids += separator + _ids(tokenizer, sentence)
        tail = end
    else:
        head = _head(tokenizer, chat_format)
        text_ids = _ids(tokenizer, chat_format.user_text(labelled_sentences(example.sentences)))
        tail = _ids(tokenizer, chat_format.suffix) or end
    body = _fit_body(example.uid, text_ids, len(head) + len(tail), max_length, truncate)
    return {"input_ids": head + body + tail, "label": example.label, "uid": example.uid}


def pad_token_id_for(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The tokenizer's pad id, or its eos id when it has no pad token (Llama-3)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; pass pad_token_id explicitly")
    return pad_id


@dataclass
class FeatureEncoder:
    """Turns a task's examples into token features with its task kind's ``encode`` (``encode_qa`` or
    ``encode_classification``), each tagged with its index among them (``example_index``, which maps
    gathered predictions back to the examples)."""

    encode: Callable[..., dict[str, Any]]
    tokenizer: Any
    chat_format: ChatFormat
    max_length: int

    def __call__(self, examples: Sequence[Example], truncate: bool) -> list[dict[str, Any]]:
        features = []
        for index, example in enumerate(examples):
            item = self.encode(example, self.tokenizer, self.chat_format, self.max_length, truncate=truncate)
            item["example_index"] = index
            features.append(item)
        return features

    @property
    def pad_token_id(self) -> int:
        """The id batches are padded with (`pad_token_id_for`)."""
        return pad_token_id_for(self.tokenizer)
