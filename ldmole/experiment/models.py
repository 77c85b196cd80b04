"""Loading base models and tokenizers: hub ids, local directories, the offline SmolLM2, tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .run_config import BackboneConfig

__all__ = ["load_tokenizer", "load_base_model", "resolve_model_source"]

RANDOM_FAMILIES = {"qwen3": "qwen3", "llama": "llama"}


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


_DTYPE_KWARG = _dtype_kwarg()


GATED_HINT = ("the repository is gated: accept its licence on its hub page with your account, then log in "
              "with `huggingface-cli login` or set HF_TOKEN (meta-llama checkpoints are gated)")


def _hub_hint(source: str, error: BaseException) -> str:
    """Why loading ``source`` failed and what to do, naming a gated repository as the cause when it is one."""
    text = f"{type(error).__name__}: {error}"
    if "gated" in text.lower() or "GatedRepoError" in text:
        return f"could not load {source!r}: {GATED_HINT} ({text[:200]})"
    return (f"could not load {source!r}: no local directory of that name and the Hugging Face hub is "
            "unreachable or the id is wrong; pass a local path (model_source=/path/to/model or tokenizer=DIR) "
            f"({text[:200]})")


def load_tokenizer(source: str):
    """A tokenizer from a local directory or hub id, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().exists() else source)
    except (OSError, ValueError) as error:
        raise OSError(f"tokenizer: {_hub_hint(source, error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_source(source: str) -> str:
    """``offline:smollm2_135m`` -> the converted local directory (converted on first use)."""
    if source == "offline:smollm2_135m":
        from .offline_model import prepare_smollm2

        return str(prepare_smollm2())
    if source.startswith("offline:"):
        raise ValueError(f"model_source={source!r}: the only offline model is offline:smollm2_135m")
    return source


def _random_model(family: str, random_init: dict[str, Any], kind: str, num_labels: int, tokenizer) -> nn.Module:
    """A randomly initialised Qwen3 / Llama of the given shape with the tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if family not in RANDOM_FAMILIES:
        raise ValueError(f"model_source=random:{family}: choose random:qwen3 or random:llama")
    config = AutoConfig.for_model(
        RANDOM_FAMILIES[family], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=num_labels,
        tie_word_embeddings=True, **random_init,
    )
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_config(config)


def load_base_model(backbone: BackboneConfig, kind: str, tokenizer, num_labels: int = 2,
                    revision: Optional[str] = None) -> nn.Module:
    """The run's base model: a causal LM (``kind="causal_lm"``) or a sequence classifier.

    ``model_source`` is a hub id, a local directory, ``offline:smollm2_135m`` or ``random:<family>``
    (shape from ``random_init``, weights from the run seed); ``revision`` pins a hub commit.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = backbone.model_source
    dtype = getattr(torch, backbone.torch_dtype)
    if source.startswith("random:"):
        model = _random_model(source.split(":", 1)[1], dict(backbone.random_init), kind, num_labels, tokenizer)
        return model.to(dtype)
    source = resolve_model_source(source)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    extra: dict[str, Any] = {} if kind == "causal_lm" else {"num_labels": num_labels}
    if revision:
        extra["revision"] = revision
    try:
        model = cls.from_pretrained(source, **{_DTYPE_KWARG: dtype}, **extra)
    except OSError as error:
        raise OSError(f"model: {_hub_hint(source, error)}") from None
    if kind != "causal_lm":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def language_model_parts(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(decoder returning hidden states, output head) of a transformers causal-LM or classifier."""
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if body is model or head is None:
        raise ValueError(f"{type(model).__name__}: expected a transformers model with a decoder body and a head")
    return body, head
