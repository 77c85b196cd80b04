"""Training checkpoints: adapter, optimizer, scheduler, RNG, data position, written atomically.

A checkpoint is the directory ``<output_dir>/checkpoints/step-<N>``. It is assembled in a hidden
temporary directory and renamed into place in one step, so a crash while writing leaves the
previous checkpoints untouched; only fully renamed ``step-*`` directories are ever read.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "write_checkpoint", "latest_checkpoint", "prune_checkpoints",
           "checkpoint_dir"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: Union[str, Path]) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_checkpoint_tmp(output_dir: Union[str, Path], step: int) -> Path:
    """A fresh hidden directory beside the checkpoints in which to assemble step ``step``."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))


def write_checkpoint(tmp: Path, step: int) -> Path:
    """Renames an assembled ``tmp`` directory to ``step-<step>`` (replacing one of the same step)."""
    final = tmp.parent / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _complete(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / "trainer_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = _complete(checkpoint_dir(output_dir))
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Union[str, Path], keep: int) -> None:
    """Deletes all but the ``keep`` newest checkpoints and leftover temporary directories."""
    root = checkpoint_dir(output_dir)
    for _, path in _complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)
