"""Training checkpoints: adapter, optimizer, scheduler, RNG, data position, written atomically.

A checkpoint is the directory ``<output_dir>/checkpoints/step-<N>``. It is assembled in a hidden
temporary directory; ``complete.json`` is written last (the run's identity, the base model's
revision and the size and SHA-256 of every file), everything is fsynced, and the directory is
renamed into place (an older ``step-<N>`` is renamed aside first and deleted after). A crash while
writing leaves the previous checkpoints untouched; a resume takes the newest checkpoint whose files
match its ``complete.json`` and falls back to an older one, saying which, when a file is truncated.

Everything a checkpoint holds loads with ``torch.load(weights_only=True)``: tensors and plain
Python values only (the RNG states are stored as such), so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..core.adapter_io import apply_umask, fsync_directory, fsync_tree, sha256_file

__all__ = ["rng_state", "set_rng_state", "new_checkpoint_tmp", "finalize_checkpoint", "latest_checkpoint",
           "resumable_checkpoint", "verify_checkpoint", "read_record", "prune_checkpoints", "checkpoint_dir",
           "load_plain", "CheckpointError", "COMPLETE_NAME", "STATE_NAME"]

COMPLETE_NAME = "complete.json"  # written last: a step directory without it is not a checkpoint
STATE_NAME = "trainer_state.pt"
FORMAT = "ldmole-checkpoint-v2"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = (".tmp-step-*", ".old-step-*")
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, truncated, of another run, or not plain data."""


def checkpoint_dir(output_dir: PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process, as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_plain(path: PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only.

    Raises:
        CheckpointError: the file holds anything else (a crafted or foreign pickle) or is unreadable;
            nothing in it has run.
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # UnpicklingError for disallowed globals, RuntimeError / EOFError when truncated
        raise CheckpointError(f"{path}: refused to load ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                              "a checkpoint holds only tensors and plain values, so this file is damaged, written "
                              "by another program or crafted") from None


def new_checkpoint_tmp(output_dir: PathLike, step: int) -> Path:
    """A fresh hidden directory beside the checkpoints in which to assemble step ``step``."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    apply_umask(tmp, directory=True)
    return tmp


def finalize_checkpoint(tmp: Path, step: int, record: dict[str, Any]) -> Path:
    """Writes ``complete.json`` (``record`` plus each file's size and SHA-256) into the assembled ``tmp``,
    flushes it to disk and renames it to ``step-<step>``; an existing one is swapped out, then deleted."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / COMPLETE_NAME).write_text(json.dumps({"format": FORMAT, "step": step, **record, "files": files}, indent=1))
    fsync_tree(tmp)
    final = tmp.parent / f"step-{step:08d}"
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-step-{step:08d}-", dir=tmp.parent))
        os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous checkpoint of this step back
            os.replace(old / final.name, final)
        raise
    fsync_directory(tmp.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(output_dir: PathLike) -> list[tuple[int, Path]]:
    root = checkpoint_dir(output_dir)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _complete(output_dir: PathLike) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in _step_dirs(output_dir) if (path / COMPLETE_NAME).is_file()]


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest checkpoint of a run whose ``complete.json`` was written (files not verified), or None."""
    found = _complete(output_dir)
    return found[-1][1] if found else None


def read_record(checkpoint: PathLike) -> dict[str, Any]:
    """The ``complete.json`` of a checkpoint.

    Raises:
        CheckpointError: it is missing (an unfinished write, or written by an ldmole that had no completion record) or
            unreadable.
    """
    path = Path(checkpoint) / COMPLETE_NAME
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {COMPLETE_NAME}: its write never finished, or an older ldmole "
                              "wrote it (those cannot be resumed)")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
        raise CheckpointError(f"{path} is not a {FORMAT} record")
    return record


def verify_checkpoint(checkpoint: PathLike) -> Optional[str]:
    """Why ``checkpoint`` cannot be resumed (a missing record or file, a size or hash that differs from
    its record), or None when every file is as written."""
    checkpoint = Path(checkpoint)
    try:
        record = read_record(checkpoint)
    except CheckpointError as error:
        return str(error)
    for name, expected in record["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{path} has {path.stat().st_size} bytes, {expected.get('bytes')} when written (truncated?)"
        if sha256_file(path) != expected.get("sha256"):
            return f"{path} differs from what was written (SHA-256 mismatch)"
    if STATE_NAME not in record["files"]:
        return f"{checkpoint} records no {STATE_NAME}"
    return None


def resumable_checkpoint(output_dir: PathLike) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint of ``output_dir`` whose files verify, and why each newer one was passed over."""
    skipped = []
    for _, path in reversed(_step_dirs(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(problem)
    return None, skipped


def prune_checkpoints(output_dir: PathLike, keep: int) -> None:
    """Deletes all but the ``keep`` newest checkpoints and this run's leftover temporary directories
    (the run folder's lock guarantees no other process is writing one)."""
    root = checkpoint_dir(output_dir)
    for _, path in _complete(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for pattern in _LEFTOVER:
        for path in root.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
