"""A MoLE adapter as an lm-evaluation-harness model (``lm_eval``, the optional extra ``ldmole[lm-eval]``).

``lm_eval.models.huggingface.HFLM`` accepts an already built ``transformers`` model: it then skips
its own loading (no ``peft=``/``delta=``, no accelerate or ``parallelize`` wrapping) and evaluates
the model as it is, on the device it is on. The MoLE layers record their routing on every forward;
each forward replaces the previous records, so evaluating keeps one batch's records alive and
nothing accumulates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["mole_lm", "default_device"]


def default_device() -> str:
    """``"cuda"`` when a CUDA GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def mole_lm(adapter: Union[str, Path], base_model: Optional[str] = None, batch_size: Union[int, str] = 8,
            device: Optional[str] = None, torch_dtype: Optional[str] = None, max_length: Optional[int] = None):
    """An ``HFLM`` over the base model with the adapter applied (``from_pretrained``), and its tokenizer.

    ``adapter`` is an adapter folder written by the trainer or a hub repository id; ``base_model``
    overrides where the base model comes from (see ``from_pretrained``). Pass the result as
    ``model=`` to ``lm_eval.simple_evaluate`` / ``lm_eval.evaluate``.

    Raises:
        ImportError: ``lm_eval`` is not installed.
        ValueError: the adapter was trained on a classification head (lm-eval scores causal LMs only).
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ImportError("mole_lm needs lm-evaluation-harness: pip install 'lm_eval>=0.4,<0.5' "
                          "(or pip install -e '.[lm-eval]')") from error
    from .adapter_info import AdapterInfo
    from .data.task_kinds import task_kind_for_model
    from .pretrained import adapter_folder, from_pretrained, load_adapter_tokenizer

    folder = adapter_folder(adapter)
    info = AdapterInfo.read(folder)
    if task_kind_for_model(info.model_kind).label_head:
        raise ValueError(f"{adapter}: a {info.model_kind} adapter ({info.task}) has a classification head; "
                         "lm-evaluation-harness scores causal language models only (adapters of QA tasks)")
    model = from_pretrained(folder, base_model=base_model, torch_dtype=torch_dtype).to(device or default_device())
    tokenizer = load_adapter_tokenizer(folder, base_model=base_model)
    # HFLM takes a built model's device and config as they are; "causal" skips its backend guess.
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)
