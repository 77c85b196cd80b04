"""Sharing adapters: save one that describes itself, load base model + adapter from the folder (or a
hub repository) in one call, and upload a folder to the hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..core.adapter_io import load_mole, save_mole
from .adapter_info import CARD_NAME, INFO_NAME, AdapterInfo, model_card

__all__ = ["save_adapter", "from_pretrained", "load_adapter_tokenizer", "push_to_hub", "adapter_folder", "RUN_ADAPTER"]

RUN_ADAPTER = "adapter"  # the final (best-epoch) adapter inside a run folder

PathLike = Union[str, Path]


def save_adapter(model: nn.Module, directory: PathLike, info: AdapterInfo,
                 metrics: Optional[dict[str, Any]] = None,
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """``save_mole`` (``state_dict``: the gathered weights to write, see there) plus
    ``adapter_info.json`` and the model card ``README.md``."""
    from ..core.adapter_io import atomic_write

    directory = save_mole(model, directory, state_dict=state_dict)
    info.write(directory)
    atomic_write(directory / CARD_NAME, lambda tmp: Path(tmp).write_text(model_card(info, metrics)))
    return directory


def adapter_folder(adapter: PathLike) -> Path:
    """The local adapter folder ``adapter`` names: itself, a run folder's ``adapter/``, or a hub
    repository id downloaded to the cache."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        # A run folder holds its final adapter in adapter/; accepting the run folder saves typing it.
        if not (path / INFO_NAME).is_file() and (path / RUN_ADAPTER / INFO_NAME).is_file():
            return path / RUN_ADAPTER
        return path
    if path.exists() or str(adapter).count("/") != 1:
        raise FileNotFoundError(f"{adapter}: not an adapter folder nor a hub repository id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(adapter)))
    except Exception as error:  # hub unreachable, repository missing or gated
        raise ConnectionError(f"could not download adapter {adapter!r} from the Hugging Face hub "
                              f"({type(error).__name__}: {str(error)[:200]}); pass a local folder") from None


def load_adapter_tokenizer(adapter: PathLike, tokenizer: Optional[str] = None, base_model: Optional[str] = None):
    """The tokenizer the adapter was trained with; ``tokenizer`` overrides where it comes from, and
    so does a ``base_model`` directory (a local copy of the base model holds its tokenizer)."""
    from .models import load_tokenizer, resolve_model_source

    info = AdapterInfo.read(adapter_folder(adapter))
    local_base = base_model if base_model and Path(base_model).is_dir() else None
    return load_tokenizer(tokenizer or local_base or info.tokenizer or resolve_model_source(info.base_model))


def from_pretrained(adapter: PathLike, base_model: Optional[str] = None, tokenizer: Optional[str] = None,
                    torch_dtype: Optional[str] = None) -> nn.Module:
    """The base model named in the adapter folder (or ``base_model``, a hub id or local directory)
    with the adapter applied, in eval mode.

    ``adapter`` is a folder written by the trainer (``adapter/``, or the run folder holding it) or a
    hub repository id. A
    ``random:<family>`` base is rebuilt from the run's seed, as the trainer built it.
    """
    from accelerate.utils import set_seed

    from .models import load_base_model
    from .run_config import BackboneConfig

    folder = adapter_folder(adapter)
    info = AdapterInfo.read(folder)
    source = base_model or info.base_model
    tok = load_adapter_tokenizer(folder, tokenizer, base_model)
    backbone = BackboneConfig(model_source=source, torch_dtype=torch_dtype or info.torch_dtype,
                              random_init=dict(info.random_init or {}))
    set_seed(info.seed)
    revision = info.base_model_revision if base_model is None else None
    model = load_base_model(backbone, info.model_kind, tok, num_labels=info.num_labels or 2, revision=revision)
    return load_mole(model, folder).eval()


def push_to_hub(adapter_dir: PathLike, repo_id: str, private: bool = True, token: Optional[str] = None,
                commit_message: str = "Upload ldmole adapter", api: Any = None) -> str:
    """Uploads an adapter folder (weights, config, info, model card) to a hub model repository.

    ``api`` is a ``huggingface_hub.HfApi`` (made here by default). Returns the repository URL.
    """
    folder = Path(adapter_dir)
    AdapterInfo.read(folder)  # refuse folders that could not be loaded back with from_pretrained
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(url)
