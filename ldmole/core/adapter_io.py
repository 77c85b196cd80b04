"""Saving and loading MoLE adapters: ``mole_config.json`` + ``adapter.safetensors`` (trained weights only),
written as one unit (``atomic_directory``) so a crash never leaves a mismatched pair."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MoLEConfig
from .injection import get_mole_model, mole_config_of, mole_layers, mole_parameters

__all__ = ["save_mole", "write_mole_files", "load_mole", "read_mole_weights", "check_base_model", "base_model_type",
           "atomic_write", "atomic_directory", "apply_umask", "current_umask", "fsync_directory", "fsync_tree", "sha256_file",
           "check_adapter_directory", "adapter_file_names", "CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_FILES",
           "TOKENIZER_FILES"]

CONFIG_NAME = "mole_config.json"
WEIGHTS_NAME = "adapter.safetensors"
# Everything an adapter folder may hold (adapter_info.json and README.md are written by ldmole.experiment).
ADAPTER_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, "adapter_info.json", "README.md"})
# What ``tokenizer.save_pretrained`` writes for the tokenizers ldmole trains with (BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                             "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})
PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike, directory: bool) -> None:
    """Gives ``path`` the permissions a plain ``open`` / ``mkdir`` would: ``0o666`` (files) or ``0o777``
    (directories) less the umask; ``mkstemp`` / ``mkdtemp`` make them 0600 / 0700, which locks out
    colleagues on shared machines."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_directory(path: PathLike) -> None:
    """Flushes a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened."""
    if os.name != "nt":
        _fsync_file(path)


def _fsync_file(path: PathLike) -> None:
    """Flushes a file's contents (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)`` then renames the temp file onto ``path``: a crash leaves the old file.

    The file is flushed to disk before the rename and the directory after it, and gets the
    permissions the umask gives (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        apply_umask(tmp, directory=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_directory(path.parent)


def sha256_file(path: PathLike) -> str:
    """The hex SHA-256 digest of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(root: PathLike) -> None:
    """Flushes every file and directory under ``root`` (and ``root`` itself) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync_file(os.path.join(folder, name))
        fsync_directory(folder)




@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yields a fresh hidden temp directory beside ``path`` to fill; on success it replaces ``path`` whole.

    On success the files are flushed to disk, an existing ``path`` is renamed aside, the temp
    directory renamed onto ``path``, the old one deleted and the parent flushed. On an exception the
    temp directory is removed and ``path`` is left untouched. (A crash between the two renames leaves
    the previous folder inside a hidden ``.<name>.old-*`` folder beside ``path``.) The directory gets
    the umask's permissions, not mkdtemp's 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        apply_umask(tmp, directory=True)
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if path.exists() or path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, aside / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        if aside is not None:
            os.replace(aside / path.name, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def adapter_file_names(directory: PathLike) -> list[str]:
    """The names in ``directory`` that belong to an adapter folder (weights, config, info, card, tokenizer files)."""
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name in ADAPTER_FILES | TOKENIZER_FILES)


def _is_adapter_entry(path: Path) -> bool:
    """Whether replacing an adapter folder may delete ``path``: an adapter file or a leftover hidden temp file."""
    leftover = path.name.startswith(".") and path.name.endswith(".tmp")
    return leftover or (path.is_file() and path.name in ADAPTER_FILES | TOKENIZER_FILES)


def check_adapter_directory(directory: PathLike) -> None:
    """Refuses to replace ``directory`` when it holds anything but adapter files (or leftover hidden ``*.tmp``).

    Raises:
        ValueError: ``directory`` is a file, or holds other files (named), which replacing it would delete.
    """
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"save_mole: {directory} is a file, not an adapter folder; pass another directory")
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if not _is_adapter_entry(p))
    if others:
        raise ValueError(f"save_mole: {directory} holds files that are not an adapter's: {others[:10]} "
                         f"({len(others)} in all); saving replaces the folder as a whole, so pass an empty or "
                         "new directory (or move those files away)")


def _check_saveable(model: nn.Module, state_dict: Optional[Mapping[str, torch.Tensor]]) -> MoLEConfig:
    """The model's MoLE config, after checking that it has one and that ``state_dict`` (when given)
    holds exactly its MoLE weights' names.

    Raises:
        ValueError: no MoLE layers, or ``state_dict`` misses or adds weights (named).
    """
    config = mole_config_of(model)
    if config is None:
        raise ValueError("save_mole: the model has no MoLE layers; call get_mole_model(model, config) first")
    if state_dict is not None:
        params = mole_parameters(model)
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise ValueError(f"save_mole: state_dict must hold exactly the MoLE weights: missing {missing[:5]} "
                             f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    return config


def base_model_type(model: nn.Module) -> Optional[str]:
    """``model.config.model_type`` ("qwen3", "llama", ...) when the model has a transformers config."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def write_mole_files(model: nn.Module, directory: PathLike,
                     state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Writes the model's MoLE config and trained weights (each shared λ-MLP once) into the EXISTING
    ``directory``, each file atomically but without replacing the folder: for callers that own the
    unit (``save_mole``'s temp folder, the trainer's checkpoint directory).

    ``state_dict`` (by the names of ``mole_parameters(model)``, exactly those) is written instead of
    the parameters' own values: under FSDP / ZeRO-3 a process holds only a slice of each parameter,
    and the trainer passes the full weights gathered with ``accelerator.get_state_dict``. The
    weights' metadata records the base model's class and ``model_type`` (checked by ``load_mole``).
    """
    config = _check_saveable(model, state_dict)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"write_mole_files: {directory} is not an existing directory; create it first "
                                "(or call save_mole, which creates the folder)")
    params = mole_parameters(model)
    source = params if state_dict is None else state_dict
    tensors = {name: source[name].detach().to("cpu").contiguous() for name in params}
    metadata = {"format": "ldmole-adapter-v1", "base_model_class": type(model).__name__}
    if base_model_type(model):
        metadata["base_model_type"] = base_model_type(model)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config.to_json()))
    return directory


def save_mole(model: nn.Module, directory: PathLike, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
              extra_files: Optional[Mapping[str, Union[str, bytes]]] = None) -> Path:
    """Writes the adapter folder ``directory`` as one unit: weights and config (see ``write_mole_files``,
    also for ``state_dict``) plus ``extra_files`` (name -> text or bytes: adapter_info.json, README.md,
    tokenizer files), replacing any previous folder whole.

    Raises:
        ValueError: the model has no MoLE layers, ``state_dict`` does not fit, an extra file name is
            not an adapter file's, or ``directory`` holds files that are not an adapter's (named).
    """
    allowed = (ADAPTER_FILES | TOKENIZER_FILES) - {WEIGHTS_NAME, CONFIG_NAME}
    for name in extra_files or {}:
        if name not in allowed:
            raise ValueError(f"save_mole: extra_files name {name!r} is not a file of an adapter folder; "
                             f"use one of {sorted(allowed)} (a later save_mole refuses folders holding others)")
    _check_saveable(model, state_dict)
    check_adapter_directory(directory)
    with atomic_directory(directory) as tmp:
        write_mole_files(model, tmp, state_dict)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return Path(directory)


def _architecture(class_name: str) -> str:
    """The architecture part of a model class name: ``Qwen3ForCausalLM`` -> ``Qwen3`` (the head stripped)."""
    return re.sub(r"(For[A-Z]\w*|LMHeadModel|Model)$", "", class_name) or class_name


def check_base_model(model: nn.Module, directory: PathLike) -> None:
    """Refuses an adapter trained on another architecture than ``model``'s.

    Compares ``model_type`` when both the adapter's metadata and the model have one, else the class
    names without their head (``Qwen3ForCausalLM`` and ``Qwen3ForSequenceClassification`` are one
    architecture: a head mismatch shows as missing or unexpected weights). Adapters without the
    record (not written by ldmole) are not checked.

    Raises:
        ValueError: the architectures differ (naming both and ``check_base=False``).
    """
    path = Path(directory) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    saved_type, saved_class = metadata.get("base_model_type"), metadata.get("base_model_class")
    model_type, model_class = base_model_type(model), type(model).__name__
    if saved_type and model_type:
        same = saved_type == model_type
    elif saved_class:
        same = _architecture(saved_class) == _architecture(model_class)
    else:
        return
    if not same:
        saved = saved_class + (f" (model_type {saved_type!r})" if saved_type else "")
        current = model_class + (f" (model_type {model_type!r})" if model_type else "")
        raise ValueError(f"load_mole: the adapter in {directory} was trained on a {saved} base, but the model is "
                         f"a {current}; load it onto the base model it was trained on, or pass check_base=False "
                         "to apply it anyway (weight names and shapes are still checked)")


def load_mole(model: nn.Module, directory: PathLike, check_base: bool = True) -> nn.Module:
    """Applies the adapter saved in ``directory`` to ``model`` (a fresh base model, or a MoLE model
    built with the same config) and returns it.

    ``check_base`` refuses an adapter trained on another architecture (see ``check_base_model``);
    ``False`` applies it whenever names and shapes fit (for experts moving an adapter across families).

    Raises:
        FileNotFoundError: a file of the adapter is missing.
        ValueError: the adapter was trained on another architecture (``check_base``), the saved config
            differs from the model's MoLE config, or a weight is missing, unexpected or of another
            shape than the model's (each named).
    """
    directory = Path(directory)
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"load_mole: {directory / file_name} does not exist; "
                                    "pass the directory save_mole wrote")
    if check_base:
        check_base_model(model, directory)
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
