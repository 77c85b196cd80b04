"""Loading base models and tokenizers: hub ids, local directories, the offline SmolLM2, tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .data.task_kinds import TaskKind, task_kind_for_model

if TYPE_CHECKING:
    from .run_config import BackboneConfig

__all__ = ["load_tokenizer", "load_base_model", "resolve_model_source", "DTYPE_KWARG"]

RANDOM_FAMILIES = {"qwen3": "qwen3", "llama": "llama"}


def _dtype_kwarg() -> str:
    """transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


DTYPE_KWARG = _dtype_kwarg()  # from_pretrained's name for the dtype argument


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
        local = Path(source).expanduser()
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else source)
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


def _auto_class(task_kind: TaskKind):
    """The transformers Auto class that builds the base model of ``task_kind``."""
    import transformers

    return getattr(transformers, task_kind.auto_model)


def _random_model(family: str, random_init: dict[str, Any], task_kind: TaskKind, num_labels: int,
                  tokenizer) -> nn.Module:
    """A randomly initialised Qwen3 / Llama of the given shape with the tokenizer's vocabulary."""
    from transformers import AutoConfig

    if family not in RANDOM_FAMILIES:
        raise ValueError(f"model_source=random:{family}: choose random:qwen3 or random:llama")
    config = AutoConfig.for_model(
        RANDOM_FAMILIES[family], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=num_labels,
        tie_word_embeddings=True, **random_init,
    )
    return _auto_class(task_kind).from_config(config)


def load_base_model(backbone: "BackboneConfig", model_kind: str, tokenizer, num_labels: int = 2,
                    revision: Optional[str] = None) -> nn.Module:
    """The run's base model of ``model_kind`` (a task kind's, as adapter_info.json records it): built by
    that task kind's ``auto_model``, a causal LM ("causal_lm") or a sequence classifier with ``num_labels``
    outputs ("classification").

    ``model_source`` is a hub id, a local directory, ``offline:smollm2_135m`` or ``random:<family>``
    (shape from ``random_init``, weights from the run seed); ``revision`` pins a hub commit.
    ``quantization`` other than none loads the linear layers in 4 or 8 bits through bitsandbytes, prepared
    for adapter training (``ldmole.experiment.quantization``; a random base is built, then quantised).

    Raises:
        ValueError: ``model_kind`` is no task kind's (naming the valid ones).
        MissingExtraError: a quantised base without bitsandbytes installed (a ValueError naming the extra).
    """
    from .quantization import (check_quantization_setup, load_quantized, prepare_kbit_model, quantization_of,
                               quantize_built_model)

    task_kind = task_kind_for_model(model_kind)
    source = backbone.model_source
    dtype = getattr(torch, backbone.torch_dtype)
    quantization = backbone.quantization
    check_quantization_setup(quantization)  # bitsandbytes missing: fail before building anything
    if source.startswith("random:"):
        model = _random_model(source.split(":", 1)[1], dict(backbone.random_init), task_kind, num_labels, tokenizer)
        if quantization != "none":
            return quantize_built_model(model, quantization, dtype, **{DTYPE_KWARG: dtype})
        return model.to(dtype)
    source = resolve_model_source(source)
    cls = _auto_class(task_kind)
    extra: dict[str, Any] = {"num_labels": num_labels} if task_kind.label_head else {}
    if revision:
        extra["revision"] = revision
    try:
        if quantization != "none":
            model = load_quantized(cls, source, quantization, dtype, **{DTYPE_KWARG: dtype}, **extra)
        else:
            model = cls.from_pretrained(source, **{DTYPE_KWARG: dtype}, **extra)
            if quantization_of(model) != "none":  # a checkpoint saved quantised loads quantised whatever the key
                prepare_kbit_model(model)
    except OSError as error:
        raise OSError(f"model: {_hub_hint(source, error)}") from None
    if task_kind.label_head:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model

