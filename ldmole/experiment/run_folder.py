"""One run per folder: an exclusive lock, a "running" marker, and the decision to start, resume or refuse.

A run folder (``output_dir``) belongs to one run. Before the model loads, :meth:`RunFolder.plan`
decides from what the folder holds and the run's settings:

- an empty folder (only ``sweep.log`` or a lock left by a finished process): start;
- ``resume=auto`` or ``resume=DIR``: continue from a checkpoint whose recorded identity equals this
  run's (every key except ``run_identity.RESUME_MAY_CHANGE``), or, with ``resume=auto`` and no
  checkpoint, start over a folder whose ``config.yaml`` is this run's and that holds no
  ``metrics.json``; anything else is refused, naming each differing key with both values;
- ``overwrite=true``: remove the old run's files, then start;
- otherwise a folder holding another run (or anything else) is refused with the three choices.

While a run works in the folder it holds ``.lock`` (``fcntl.flock``, released by the kernel when the
process dies, so a killed run never leaves a stale lock) and ``running.json`` says who runs it; a
second writer fails at once naming the holder's pid and host.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Union

import yaml

from .checkpointing import CheckpointError, read_record, resumable_checkpoint, verify_checkpoint
from .metrics import METRICS_NAME
from .run_identity import (BOOKKEEPING_KEYS, RESUME_MAY_CHANGE, describe_differences, differences, identity,
                           identity_hash)

__all__ = ["RunFolder", "RunPlan", "RunFolderError", "RunFolderBusyError", "check_identity", "LOCK_NAME",
           "RUNNING_NAME", "CONFIG_NAME",
           "LOG_NAME", "TRACKER_DIR", "LAUNCHER_FILES", "RUN_FILES", "saved_config_differences"]

LOCK_NAME = ".lock"
RUNNING_NAME = "running.json"
CONFIG_NAME = "config.yaml"
LOG_NAME = "log.jsonl"
TRACKER_DIR = "ldmole"  # accelerate's tracker logs (report_to=tensorboard) under output_dir/<run name>
# Files that are not the run's: the sweep's launch log and the lock (kept across runs).
LAUNCHER_FILES = ("sweep.log", LOCK_NAME)
# What a run writes into its folder (overwrite=true removes exactly these).
# Hidden ".<name>.*" entries are their temporary copies (atomic writes interrupted by a crash).
RUN_FILES = (CONFIG_NAME, METRICS_NAME, LOG_NAME, RUNNING_NAME, "checkpoints", "adapter", "adapter_epoch*", "plots",
             "routing_summary.json", TRACKER_DIR)

PathLike = Union[str, Path]


class RunFolderError(ValueError):
    """The output folder holds another run, or a resume would continue a different run."""


class RunFolderBusyError(RunFolderError):
    """Another process holds the folder's lock."""


@dataclass(frozen=True)
class RunPlan:
    """What the run does with its folder: continue from ``resume_from``, or start (clearing ``clear`` first)."""

    resume_from: Optional[Path] = None
    clear: tuple[str, ...] = ()  # entries of the folder to remove before anything is written
    note: Optional[str] = None   # said to the user (a restart, a skipped checkpoint)


def _is_run_file(name: str) -> bool:
    """Whether a folder entry is something a run writes (or a temporary copy of one)."""
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f".{pattern}.*")
               for pattern in RUN_FILES)


def saved_config_differences(folder: PathLike, flat_config: dict[str, Any],
                             ignore=BOOKKEEPING_KEYS) -> Optional[list[tuple[str, Any, Any]]]:
    """How the ``config.yaml`` in ``folder`` differs from ``flat_config`` (``RunConfig.to_flat()``) on the
    keys that are not in ``ignore``; None when the folder has no ``config.yaml``.

    Raises:
        RunFolderError: ``config.yaml`` cannot be read as a run config.
    """
    from .run_config import RunConfig

    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        saved = RunConfig.from_flat(yaml.safe_load(path.read_text()) or {}).to_flat()
    except (ValueError, TypeError, yaml.YAMLError) as error:
        raise RunFolderError(f"{path} is not a readable run config ({error})") from None
    return differences(identity(saved, ignore), identity(flat_config, ignore))


class RunFolder:
    """A run's ``output_dir``: its lock, its running marker, and what a new run may do with it."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._lock: Optional[IO[str]] = None

    # -- the lock and the running marker ------------------------------------------------------------

    def acquire(self) -> None:
        """Takes the folder's exclusive lock and writes who holds it into the lock file.

        Raises:
            RunFolderBusyError: another process holds it (its pid, host and start time named).
        """
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunFolderBusyError(f"{self.path} is in use by another run ({holder}); two processes must not write "
                                     "one output_dir: wait for it to finish, or choose another output_dir") from None
        me = self.whoami()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {me['pid']} on {me['host']} since {me['started']}\n")
        handle.flush()
        self._lock = handle

    def mark_running(self, config_flat: dict[str, Any]) -> None:
        """Writes ``running.json`` (who runs which run since when); removed by :meth:`release`."""
        marker = {**self.whoami(), "model": config_flat.get("model"), "task": config_flat.get("task"),
                  "method": config_flat.get("method"), "seed": config_flat.get("seed")}
        (self.path / RUNNING_NAME).write_text(json.dumps(marker, indent=1) + "\n")

    def release(self) -> None:
        """Removes ``running.json`` and releases the lock (the lock file stays: deleting it would race)."""
        if self._lock is None:
            return
        (self.path / RUNNING_NAME).unlink(missing_ok=True)
        self._lock.close()  # closing the descriptor releases the flock
        self._lock = None

    @staticmethod
    def whoami() -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> Optional[str]:
        """Who holds the lock now ("pid N on HOST since ..."), or None when nobody does."""
        import fcntl

        if not (self.path / LOCK_NAME).is_file():
            return None
        with open(self.path / LOCK_NAME) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "an unknown process"
            return None

    # -- what a new run may do with the folder ------------------------------------------------------

    def entries(self) -> list[str]:
        """The folder's entries that belong to a run (everything but the sweep's log and the lock)."""
        if not self.path.is_dir():
            return []
        return sorted(name for name in os.listdir(self.path) if name not in LAUNCHER_FILES)

    def plan(self, config) -> RunPlan:
        """Decides, before anything is loaded or written, whether the run ``config`` starts, resumes or
        is refused (see the module docstring).

        Raises:
            RunFolderError: the folder holds another run or unknown files, or the checkpoint to resume
                belongs to another run; the message names the differing keys and the choices.
            CheckpointError: ``resume=DIR`` names a checkpoint that is incomplete or damaged.
        """
        resume, overwrite = config.logging.resume, config.logging.overwrite
        flat = config.to_flat()
        entries = self.entries()
        stale = [RUNNING_NAME] if RUNNING_NAME in entries else []  # a killed run's marker (we hold the lock)
        if overwrite:
            unknown = [name for name in entries if not _is_run_file(name)]
            if unknown:
                raise RunFolderError(f"overwrite=true removes a run's files, but {self.path} also holds {unknown}, "
                                     "which no run wrote; move them away or choose another output_dir")
            return RunPlan(clear=tuple(entries), note=f"overwrite=true: removed the earlier run in {self.path}"
                           if set(entries) - set(stale) else None)
        if resume and resume != "auto":
            return self._plan_explicit(Path(resume), config, flat, entries)
        if resume == "auto":
            return self._plan_auto(config, flat, entries)
        if set(entries) - set(stale):
            raise RunFolderError(
                f"output_dir {self.path} already holds {_listing(entries)}; resume=auto continues that run, "
                "overwrite=true removes its files and starts again, or choose another output_dir")
        return RunPlan(clear=tuple(stale))

    def _check_same_run(self, flat: dict[str, Any], what: str) -> None:
        """Refuses when the folder's ``config.yaml`` is another run's (ignoring what a resume may change)."""
        diffs = saved_config_differences(self.path, flat, RESUME_MAY_CHANGE)
        if diffs:
            raise RunFolderError(f"{what}: {self.path / CONFIG_NAME} is another run's ("
                                 f"{describe_differences(diffs, 'folder', 'this run')}); overwrite=true starts "
                                 "again there, or choose another output_dir")

    def _plan_auto(self, config, flat: dict[str, Any], entries: list[str]) -> RunPlan:
        checkpoint, skipped = resumable_checkpoint(self.path)
        if checkpoint is not None:
            check_identity(checkpoint, flat)
            self._check_same_run(flat, f"resume=auto from {checkpoint}")
            note = None
            if skipped:
                note = f"resume=auto: resuming from {checkpoint}; passed over newer: " + "; ".join(skipped)
            return RunPlan(resume_from=checkpoint, clear=_present(entries, (METRICS_NAME, RUNNING_NAME)), note=note)
        if skipped:
            raise RunFolderError(f"resume=auto: no checkpoint in {self.path / 'checkpoints'} can be resumed (" +
                                 "; ".join(skipped) + "); overwrite=true starts again")
        if not entries:
            return RunPlan()
        if CONFIG_NAME not in entries:
            raise RunFolderError(f"resume=auto: output_dir {self.path} holds {_listing(entries)} but no {CONFIG_NAME} "
                                 "of a run; overwrite=true removes them, or choose another output_dir")
        self._check_same_run(flat, "resume=auto")
        if METRICS_NAME in entries:
            raise RunFolderError(f"resume=auto: {self.path} holds a finished run of these settings ({METRICS_NAME}) "
                                 "and no checkpoint to continue from; overwrite=true runs it again")
        unknown = [name for name in entries if not _is_run_file(name)]
        if unknown:
            raise RunFolderError(f"resume=auto: {self.path} also holds {unknown}, which no run wrote; move them away")
        return RunPlan(clear=tuple(entries), note=f"resume=auto: no checkpoint in {self.path}; starting this run over")

    def _plan_explicit(self, checkpoint: Path, config, flat: dict[str, Any], entries: list[str]) -> RunPlan:
        problem = verify_checkpoint(checkpoint)
        if problem is not None:
            raise CheckpointError(f"resume={checkpoint}: {problem}; pass a complete checkpoints/step-N directory, "
                                  "or resume=auto for the newest usable one")
        check_identity(checkpoint, flat)
        if set(entries) - {RUNNING_NAME}:
            self._check_same_run(flat, f"resume={checkpoint}")
        return RunPlan(resume_from=checkpoint, clear=_present(entries, (METRICS_NAME, RUNNING_NAME)))

    def clear(self, plan: RunPlan) -> None:
        """Removes what ``plan`` clears (before the run writes anything)."""
        for name in plan.clear:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def _defaults_of(keys: set[str]) -> dict[str, Any]:
    """The defaults of config keys (flat, ``mole.<field>``) as plain data: what a checkpoint written before a key
    existed ran with (a key is added with the default that keeps the earlier behaviour)."""
    from .run_config import describe_keys

    return json.loads(json.dumps({key: default for key, default, _ in describe_keys() if key in keys}))


def check_identity(checkpoint: Path, flat: dict[str, Any]) -> None:
    """Refuses a checkpoint whose recorded identity is not this run's, naming each differing key.

    Raises:
        RunFolderError: the identities differ.
    """
    record = read_record(checkpoint)
    saved = record.get("identity")
    current = identity(flat)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{checkpoint}/complete.json records no run identity")
    if record.get("identity_hash") == identity_hash(current) and saved == current:
        return
    saved = {**_defaults_of(set(current) - set(saved)), **saved}
    diffs = differences(saved, current)
    if not diffs:
        return
    diffs = describe_differences(diffs, "checkpoint", "this run")
    raise RunFolderError(f"resume: {checkpoint} belongs to another run ({diffs}); resume it with its own settings "
                         "(only max_steps, num_epochs and the logging keys may change: docs/runs.md, Failure modes), "
                         "or "
                         "start this run with overwrite=true or another output_dir")


def _present(entries: list[str], names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in names if name in entries)


def _listing(entries: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"{name}/" if name in ("checkpoints", "adapter") or name.startswith("adapter_epoch") else name
                      for name in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
