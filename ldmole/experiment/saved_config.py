"""A run's config read back after the run: from its folder's ``config.yaml``, or rebuilt from an adapter
folder's ``adapter_info.json`` alone, with the data and tokenizer paths of this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import yaml

from .adapter_info import AdapterInfo
from .run_config import RunConfig

__all__ = ["load_run_config", "adapter_run_config"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_run_config(run_dir: Union[str, Path], data_dir: Optional[str] = None,
                    tokenizer: Optional[str] = None) -> RunConfig:
    """The run's config (config.yaml re-validated), with the given path overrides.

    A relative data_dir / tokenizer that does not exist from the current directory but does from
    the repository root (where run.sh and ldmole-sweep run) is taken from there.

    Raises:
        FileNotFoundError: ``run_dir`` has no config.yaml (naming the command that writes one).
        ValueError: config.yaml has an unknown key or a bad value (naming it).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder written by ldmole.cli.train")
    saved = yaml.safe_load(path.read_text()) or {}
    for key in ("data_dir", "tokenizer"):
        value = saved.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO_ROOT / value).exists():
            saved[key] = str(REPO_ROOT / value)
    if data_dir is not None:
        saved["data_dir"] = data_dir
    if tokenizer is not None:
        saved["tokenizer"] = tokenizer
    return RunConfig.from_flat(saved)


def adapter_run_config(info: AdapterInfo, data_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> RunConfig:
    """A run config rebuilt from an adapter folder's record alone (no config.yaml): its model, task,
    method, seed and prompt format; data settings are the defaults (protocol "selection", all examples)."""
    flat = {"task": info.task, "method": info.method, "seed": info.seed, "model_source": info.base_model,
            "tokenizer": tokenizer or info.tokenizer, "chat_format": info.chat_format, "torch_dtype": info.torch_dtype,
            "random_init": dict(info.random_init or {}), "data_dir": data_dir}
    if info.model:
        flat["model"] = info.model
    return RunConfig.from_flat(flat)
