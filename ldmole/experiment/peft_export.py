"""Exporting a plain-LoRA adapter (``method=lora``) to PEFT's format, so ``PeftModel.from_pretrained``
loads it. Mixture adapters have no PEFT equivalent: PEFT's LoRA layer holds one low-rank update per
module and no router, while a MoLE layer holds E experts mixed per token by a router (and, for
LD-MoLE, a λ-MLP shared across layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..core.injection import mole_config_of, mole_layers, mole_parameters

__all__ = ["export_peft_lora"]

PEFT_PREFIX = "base_model.model."


def export_peft_lora(model: nn.Module, directory: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA format.

    Raises:
        ValueError: the model is not a MoLE model with ``router="lora"`` (naming why PEFT cannot hold it).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = mole_config_of(model)
    if config is None:
        raise ValueError("export_peft_lora: the model has no adapter; build it with get_mole_model or load_mole")
    if config.router != "lora":
        raise ValueError(f"export_peft_lora: router={config.router!r} is a mixture of {config.num_experts} LoRA experts "
                         "with a router; PEFT's LoRA has one update per module and no router, so only method=lora "
                         "(router='lora') adapters export")
    layers = mole_layers(model)
    tensors = {}
    for layer in layers:
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_A.weight"] = layer.lora_A[0].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{layer.name}.lora_B.weight"] = layer.lora_B[0].detach().cpu().contiguous()
    adapter_names = {f"{layer.name}.{p}" for layer in layers for p in ("lora_A", "lora_B")}
    heads = sorted({name.rsplit(".", 1)[0] for name in mole_parameters(model) if name not in adapter_names})
    for name, param in mole_parameters(model).items():
        if name not in adapter_names:
            tensors[f"{PEFT_PREFIX}{name}"] = param.detach().cpu().contiguous()
    is_classifier = bool(heads)
    peft_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
        target_modules=[layer.name for layer in layers],
        modules_to_save=heads or None, task_type="SEQ_CLS" if is_classifier else "CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
