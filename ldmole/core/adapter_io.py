"""Saving and loading MoLE adapters: ``mole_config.json`` + ``adapter.safetensors`` (trained weights only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MoLEConfig
from .injection import get_mole_model, mole_config_of, mole_layers, mole_parameters

__all__ = ["save_mole", "load_mole", "read_mole_weights", "atomic_write", "CONFIG_NAME", "WEIGHTS_NAME"]

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


def save_mole(model: nn.Module, directory: PathLike,
              state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Writes the model's MoLE config and trained weights (each shared λ-MLP once) to ``directory``.

    ``state_dict`` (by the names of ``mole_parameters(model)``, exactly those) is written instead of
    the parameters' own values: under FSDP / ZeRO-3 a process holds only a slice of each parameter,
    and the trainer passes the full weights gathered with ``accelerator.get_state_dict``.
    """
    config = mole_config_of(model)
    if config is None:
        raise ValueError("save_mole: the model has no MoLE layers; call get_mole_model(model, config) first")
    directory = Path(directory)
    params = mole_parameters(model)
    if state_dict is not None:
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise ValueError(f"save_mole: state_dict must hold exactly the MoLE weights: missing {missing[:5]} "
                             f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    source = params if state_dict is None else state_dict
    tensors = {name: source[name].detach().to("cpu").contiguous() for name in params}
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
    expected = mole_parameters(model)
    saved = read_mole_weights(directory, {name: param.shape for name, param in expected.items()})
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(saved[name].to(param.dtype))
    return model


def read_mole_weights(directory: PathLike, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The weights in ``directory/adapter.safetensors``, checked to be exactly ``shapes`` (names and
    shapes; a sharded model's parameters are slices, so the trainer records the full shapes first).

    Raises:
        ValueError: a weight is missing, unexpected or of another shape (each named).
    """
    directory = Path(directory)
    saved = load_file(str(directory / WEIGHTS_NAME))
    missing = sorted(set(shapes) - set(saved))
    unexpected = sorted(set(saved) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"load_mole: adapter in {directory} does not fit this model: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all); "
            "was it trained on another base model?"
        )
    for name, shape in shapes.items():
        if saved[name].shape != shape:
            raise ValueError(
                f"load_mole: {name} has shape {tuple(saved[name].shape)} in {directory} but "
                f"{tuple(shape)} in the model; was it trained on another base model or config?"
            )
    return saved
