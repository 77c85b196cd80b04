"""Examples -> token ids (prompt, supervised answer, option-letter candidates) and padded batches.

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

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from .chat import ChatFormat
from .examples import Example, labelled_sentences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX", "letter_token_ids", "encode_qa", "encode_classification", "encode_prompt", "end_token_id",
    "collate", "pad_token_id_for",
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
        example.uid, _ids(tokenizer, chat_format.user_text(example.prompt)), len(head) + len(tail) + len(answer_ids), max_length, truncate
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


def collate(
    batch: Sequence[dict[str, Any]], pad_token_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, Any]:
    """Pad a list of `encode_qa` or `encode_classification` outputs into tensors.

    Always: ``input_ids``, ``attention_mask`` [B, T], ``sequence_lengths`` [B], ``uid`` (list).
    QA adds ``labels`` [B, T] (-100 on padding), ``last_prompt_index`` [B] (the position whose
    logits score the options, padding included), ``answer`` [B], ``option_token_ids``
    [B, max_options, max_variants] (-1 fill), ``option_mask`` [B, max_options] (bool) and
    ``category`` (list). Classification adds ``label`` [B] and ``last_token_index`` [B].
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    lengths = [len(features["input_ids"]) for features in batch]
    width = max(lengths)
    offsets = [width - length if padding_side == "left" else 0 for length in lengths]

    def pad(values: list[int], fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + values if padding_side == "left" else values + padding

    out: dict[str, Any] = {
        "input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in batch], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * n, 0) for n in lengths], dtype=torch.long),
        "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        "uid": [f.get("uid") for f in batch],
    }
    if "labels" in batch[0]:
        out["labels"] = torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in batch], dtype=torch.long)
        out["last_prompt_index"] = torch.tensor(
            [offset + f["prompt_length"] - 1 for offset, f in zip(offsets, batch)], dtype=torch.long
        )
        out["answer"] = torch.tensor([f["answer"] for f in batch], dtype=torch.long)
        out["option_token_ids"], out["option_mask"] = _option_tensor([f["option_token_ids"] for f in batch])
        out["category"] = [f.get("category") for f in batch]
    else:
        out["label"] = torch.tensor([f["label"] for f in batch], dtype=torch.long)
        out["last_token_index"] = torch.tensor(
            [offset + n - 1 for offset, n in zip(offsets, lengths)], dtype=torch.long
        )
    return out


def _option_tensor(options: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_options, max_variants] candidate ids (-1 fill) and the [B, max_options] option mask."""
    max_options = max(len(per_example) for per_example in options)
    max_variants = max(len(ids) for per_example in options for ids in per_example)
    ids = torch.full((len(options), max_options, max_variants), -1, dtype=torch.long)
    mask = torch.zeros((len(options), max_options), dtype=torch.bool)
    for row, per_example in enumerate(options):
        for column, variants in enumerate(per_example):
            ids[row, column, : len(variants)] = torch.tensor(variants, dtype=torch.long)
            mask[row, column] = True
    return ids, mask
