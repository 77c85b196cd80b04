"""Saving and loading MoLE adapters: ``mole_config.json`` + ``adapter.safetensors`` (trained weights only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MoLEConfig
from .injection import get_mole_model, mole_config_of, mole_layers, mole_parameters

__all__ = ["save_mole", "load_mole", "atomic_write", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "mole_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write) -> None:
    """Calls ``write(tmp_path)`` then renames the temp file onto ``path``: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_mole(model: nn.Module, directory: PathLike) -> Path:
    """Writes the model's MoLE config and trained weights (each shared λ-MLP once) to ``directory``."""
    config = mole_config_of(model)
    if config is None:
        raise ValueError("save_mole: the model has no MoLE layers; call get_mole_model(model, config) first")
    directory = Path(directory)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in mole_parameters(model).items()}
    metadata = {"format": "ldmole-adapter-v1", "base_model_class": type(model).__name__}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config.to_json()))
    return directory


def load_mole(model: nn.Module, directory: PathLike) -> nn.Module:
    """Applies the adapter saved in ``directory`` to ``model`` (a fresh base model, or a MoLE model
    built with the same config) and returns it.

    Raises:
        FileNotFoundError: a file of the adapter is missing.
        ValueError: the saved config differs from the model's MoLE config, or a weight is missing,
            unexpected or of another shape than the model's (each named).
    """
    directory = Path(directory)
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"load_mole: {directory / file_name} does not exist; pass the directory save_mole wrote")
    config = MoLEConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    if mole_layers(model):
        current = mole_config_of(model)
        if current != config:
            raise ValueError(
                f"load_mole: the model's MoLE config {current} differs from the saved one {config}; "
                "load into a fresh base model instead"
            )
    else:
        get_mole_model(model, config)
    saved = load_file(str(directory / WEIGHTS_NAME))
    expected = mole_parameters(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"load_mole: adapter in {directory} does not fit this model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all); "
            "was it trained on another base model?"
        )
    for name, param in expected.items():
        if saved[name].shape != param.shape:
            raise ValueError(
                f"load_mole: {name} has shape {tuple(saved[name].shape)} in {directory} but "
                f"{tuple(param.shape)} in the model; was it trained on another base model or config?"
            )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(saved[name].to(param.dtype))
    return model
