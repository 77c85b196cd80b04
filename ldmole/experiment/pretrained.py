"""Sharing adapters: save one that describes itself, load base model + adapter from the folder (or a
hub repository) in one call, and upload a folder to the hub."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from ..core.adapter_io import (CONFIG_NAME, WEIGHTS_NAME, adapter_file_names, atomic_directory,
                               check_adapter_directory, load_mole, write_mole_files)
from .adapter_info import CARD_NAME, INFO_NAME, AdapterInfo, is_hub_id, is_local_path, model_card
from .quantization import model_card_note, quantization_of

__all__ = ["save_adapter", "from_pretrained", "load_adapter_tokenizer", "push_to_hub", "adapter_folder", "RUN_ADAPTER",
           "recorded_quantization"]

RUN_ADAPTER = "adapter"  # the final (best-epoch) adapter inside a run folder
QUANTIZATION_KEY = "quantization"  # adapter_info.json's extra: the quantisation of the base it was trained on

PathLike = Union[str, Path]


def save_adapter(model: nn.Module, directory: PathLike, info: AdapterInfo,
                 metrics: Optional[dict[str, Any]] = None,
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None, tokenizer: Any = None) -> Path:
    """Writes the adapter folder as one unit (``atomic_directory``): weights and config
    (``write_mole_files``; ``state_dict``: the gathered weights to write, see there), ``adapter_info.json``,
    the model card ``README.md`` and, when ``info.tokenizer_in_folder``, the tokenizer's files.

    ``tokenizer`` is the run's tokenizer object (saved with ``save_pretrained``); without it the
    tokenizer is loaded from ``info.tokenizer_source``.

    A base quantised with bitsandbytes is recorded as ``info.extra["quantization"]`` (what
    ``from_pretrained`` loads by default) and described in the model card; only the float32 adapter is
    written, never a base weight.

    Raises:
        ValueError: ``directory`` holds files that are not an adapter's (named), ``state_dict`` does
            not fit, or the tokenizer belongs in the folder but neither ``tokenizer`` nor its source is known.
    """
    if info.tokenizer_in_folder and tokenizer is None:
        if not info.tokenizer_source:
            raise ValueError(f"save_adapter: {directory}: info.tokenizer_in_folder is set but no tokenizer is "
                             "given; pass tokenizer=<the run's tokenizer> (or set info.tokenizer_source)")
        from .models import load_tokenizer

        tokenizer = load_tokenizer(info.tokenizer_source)
    check_adapter_directory(directory)
    quantization = quantization_of(model)
    card = model_card(info, metrics)
    if quantization != "none":
        info = dataclasses.replace(info, extra={**info.extra, QUANTIZATION_KEY: quantization})
        card = _with_section(card, "## Base model quantisation", model_card_note(quantization, info.torch_dtype))
    with atomic_directory(directory) as tmp:
        write_mole_files(model, tmp, state_dict=state_dict)
        (tmp / INFO_NAME).write_text(info.to_json())
        (tmp / CARD_NAME).write_text(card)
        if info.tokenizer_in_folder:
            tokenizer.save_pretrained(str(tmp))
    return Path(directory)


def _with_section(card: str, title: str, text: str) -> str:
    """The model card ``card`` with a section ``title`` holding ``text`` before its "## Use" section (at the end
    when it has none)."""
    section = f"{title}\n\n{text}\n\n"
    marker = "\n## Use\n"
    if marker in card:
        return card.replace(marker, f"\n{section}## Use\n", 1)
    return card.rstrip("\n") + "\n\n" + section


def recorded_quantization(info: AdapterInfo) -> str:
    """The quantisation of the base the adapter was trained on, as ``save_adapter`` recorded it ("none" when
    the record has none: a full-precision base, or a folder written before quantisation existed)."""
    return str(info.extra.get(QUANTIZATION_KEY, "none"))


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
    """The tokenizer the adapter was trained with: its own files in the folder (``tokenizer_in_folder``),
    else the recorded hub id (or, in older folders, local path), else the base model's.
    ``tokenizer`` overrides where it comes from, and so does a ``base_model`` directory (a local
    copy of the base model holds its tokenizer)."""
    from .models import load_tokenizer, resolve_model_source

    folder = adapter_folder(adapter)
    info = AdapterInfo.read(folder)
    local_base = base_model if base_model and Path(base_model).is_dir() else None
    own = str(folder) if info.tokenizer_in_folder else None
    return load_tokenizer(tokenizer or local_base or own or info.tokenizer or resolve_model_source(info.base_model))


def from_pretrained(adapter: PathLike, base_model: Optional[str] = None, tokenizer: Optional[str] = None,
                    torch_dtype: Optional[str] = None, check_base: bool = True,
                    quantization: Optional[str] = None) -> nn.Module:
    """The base model named in the adapter folder (or ``base_model``, a hub id or local directory)
    with the adapter applied, in eval mode.

    ``adapter`` is a folder written by the trainer (``adapter/``, or the run folder holding it) or a
    hub repository id. A ``random:<family>`` base is rebuilt from the run's seed, as the trainer
    built it. ``check_base`` is passed to ``load_mole`` (``False`` skips the architecture check).
    ``quantization`` (none, nf4, fp4, int8; the run key of that name) loads the base quantised with
    bitsandbytes; None = as the adapter was trained (recorded in adapter_info.json). An adapter trained on
    a quantised base loads on a full-precision one and the reverse: the architecture is the same.

    Raises:
        ValueError: ``quantization`` or ``torch_dtype`` is not a valid value (naming the choices);
            ``MissingExtraError`` (a ValueError) when the quantisation needs bitsandbytes and it is missing.
    """
    from accelerate.utils import set_seed

    from .models import load_base_model
    from .run_config import BackboneConfig

    folder = adapter_folder(adapter)
    info = AdapterInfo.read(folder)
    source = base_model or info.base_model
    tok = load_adapter_tokenizer(folder, tokenizer, base_model)
    backbone = BackboneConfig(model_source=source, torch_dtype=torch_dtype or info.torch_dtype,
                              random_init=dict(info.random_init or {}),
                              quantization=recorded_quantization(info) if quantization is None else quantization)
    set_seed(info.seed)
    revision = info.base_model_revision if base_model is None else None
    model = load_base_model(backbone, info.model_kind, tok, num_labels=info.num_labels or 2, revision=revision)
    return load_mole(model, folder, check_base=check_base).eval()


def upload_names(folder: Path) -> list[str]:
    """The files of ``folder`` that an upload takes: the adapter's own and its tokenizer's, nothing else.

    Raises:
        FileNotFoundError: the weights or the MoLE config are missing (naming the file).
    """
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"push_to_hub: {folder / name} does not exist; pass a folder written by "
                                    "save_adapter (ldmole-train's adapter/)")
    return adapter_file_names(folder)


def published_info(info: AdapterInfo, path: Path, base_model_id: Optional[str],
                   tokenizer_id: Optional[str]) -> AdapterInfo:
    """``info`` as it may be published: the given hub ids in place of local paths (a local base's
    revision is dropped: it belongs to the local copy, not necessarily to ``base_model_id``).

    Raises:
        ValueError: ``base_model`` or ``tokenizer`` names a local path and no hub id is given for it
            (naming the file, the key and the argument / flag that fixes it).
    """
    for key, given in (("base_model_id", base_model_id), ("tokenizer_id", tokenizer_id)):
        if given is not None and is_local_path(given):
            raise ValueError(f"push_to_hub: {key}={given!r} is a local path; pass the hub id (owner/name) to record")
    if base_model_id is None and is_local_path(info.base_model):
        raise ValueError(f"push_to_hub: {path} names the local base model base_model={info.base_model!r}, which "
                         "means nothing on the hub; pass the hub id to record instead: "
                         "base_model_id='owner/name' (ldmole-push-to-hub --base-model-id owner/name)")
    if tokenizer_id is None and info.tokenizer and is_local_path(info.tokenizer):
        raise ValueError(f"push_to_hub: {path} names the local tokenizer tokenizer={info.tokenizer!r}; pass the "
                         "hub id to record instead: tokenizer_id='owner/name' (ldmole-push-to-hub --tokenizer-id), "
                         "or save the adapter again with save_adapter(..., tokenizer=...) to carry its files")
    if base_model_id is None and tokenizer_id is None:
        return info
    return dataclasses.replace(info, base_model=base_model_id or info.base_model,
                               tokenizer=tokenizer_id or info.tokenizer,
                               base_model_revision=info.base_model_revision
                               if base_model_id in (None, info.base_model) else None)


def published_card(text: str, info: AdapterInfo, published: AdapterInfo) -> str:
    """The model card ``text`` with the local base model path replaced by the published hub id, which
    the front matter then names too."""
    if published.base_model == info.base_model:
        return text
    text = text.replace(info.base_model, published.base_model)
    front = text.split("\n---", 1)[0]
    if is_hub_id(published.base_model) and "\nbase_model: " not in front:
        text = text.replace("library_name: ldmole\n", f"library_name: ldmole\nbase_model: {published.base_model}\n", 1)
    return text


@contextlib.contextmanager
def staged_folder(folder: Path, names: list[str], info: AdapterInfo, published: AdapterInfo) -> Iterator[Path]:
    """``folder`` itself when ``published`` is ``info``; else a temporary copy of ``names`` whose
    adapter_info.json and model card say ``published`` (the adapter folder is left as it is)."""
    if published == info:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=".ldmole-push-") as staging:
        for name in names:
            if name in (INFO_NAME, CARD_NAME):
                continue  # rewritten below; hard links would write through to the adapter folder
            try:
                os.link(folder / name, Path(staging) / name)
            except OSError:  # another file system, or no hard links
                shutil.copy2(folder / name, Path(staging) / name)
        (Path(staging) / INFO_NAME).write_text(published.to_json())
        if CARD_NAME in names:
            (Path(staging) / CARD_NAME).write_text(published_card((folder / CARD_NAME).read_text(), info, published))
        yield Path(staging)


def push_to_hub(adapter_dir: PathLike, repo_id: str, private: bool = True, token: Optional[str] = None,
                commit_message: str = "Upload ldmole adapter", api: Any = None, base_model_id: Optional[str] = None,
                tokenizer_id: Optional[str] = None) -> str:
    """Uploads an adapter folder's own files (weights, config, info, model card, tokenizer files when
    present; nothing else in the folder) to a hub model repository.

    ``api`` is a ``huggingface_hub.HfApi`` (made here by default). ``base_model_id`` / ``tokenizer_id``:
    the hub ids the uploaded adapter_info.json records in place of a local base model / tokenizer path
    (the local folder is not changed). Returns the repository URL.

    Raises:
        FileNotFoundError: no adapter_info.json, weights or config.
        ValueError: adapter_info.json names a local path with no hub id given for it, or
            ``private`` is asked for but the existing repository is public.
    """
    folder = Path(adapter_dir)
    info = AdapterInfo.read(folder)  # refuse folders that could not be loaded back with from_pretrained
    names = upload_names(folder)
    published = published_info(info, folder / INFO_NAME, base_model_id, tokenizer_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if private and getattr(api.repo_info(repo_id, repo_type="model"), "private", None) is not True:
        raise ValueError(f"push_to_hub: the repository {repo_id} already exists and is public (not private); "
                         "private=True does not make an existing repository private, so nothing was uploaded. "
                         "Upload anyway with private=False (ldmole-push-to-hub --public), or make it private on "
                         "the hub first")
    with staged_folder(folder, names, info, published) as upload:
        api.upload_folder(folder_path=str(upload), repo_id=repo_id, repo_type="model", allow_patterns=names,
                          commit_message=commit_message)
    return str(url)
