"""Trustworthy runs: one run per folder, a resume continues only its own run, nothing read from disk runs
code, and a crash at any moment loses at most the work since the last checkpoint (docs/runs.md: Failure modes)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmole.experiment import checkpointing, run_identity
from ldmole.experiment.checkpointing import CheckpointError, latest_checkpoint, load_plain, verify_checkpoint
from ldmole.experiment.run_config import RunConfig, compose_config, flat_keys
from ldmole.experiment.run_folder import RunFolder, RunFolderBusyError, RunFolderError
from ldmole.experiment.trainer import train
from tests.helpers import REPO_ROOT, tiny_run

TINY = ("train_max_examples=64", "eval_max_examples=16", "batch_size=4",
                          "per_device_batch_size=4", "mole.num_experts=4",)  # settings every tiny run of this file shares


def tiny(tmp: Path, *extra: str) -> RunConfig:
    return compose_config(tiny_run(*TINY, "method=ldmole", f"output_dir={tmp}", *extra))


# -- 1. A run folder holds one run --------------------------------------------------------------------


def test_overwrite_never_deletes_files_that_no_run_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    folder = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match="notes.txt"):
        folder.plan(tiny(tmp_path, "overwrite=true"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from ldmole.experiment.run_folder import RunFolder; f = RunFolder(sys.argv[1]); "
            "f.acquire(); f.mark_running({'seed': 1}); print('held', flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        assert (tmp_path / "running.json").is_file(), "a run in progress is marked"
        assert json.loads((tmp_path / "running.json").read_text())["pid"] == holder.pid
        leftover = tmp_path / "checkpoints" / ".tmp-step-00000003-inflight"
        leftover.mkdir(parents=True)  # the holder's checkpoint in progress
        started = time.time()
        with pytest.raises(RunFolderBusyError) as error:
            train(tiny(tmp_path, "max_steps=1", "resume=auto"))
        assert time.time() - started < 10, "the second writer must fail before loading anything"
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(error.value)
        assert leftover.is_dir(), "the second writer must not prune the holder's temporary checkpoint"
        assert RunFolder(tmp_path).holder().startswith(f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunFolder(tmp_path).holder() is None, "a killed holder's lock is released by the kernel"


# -- 2. A resume continues only its own run ------------------------------------------------------------


def test_the_identity_lists_name_real_keys_and_leave_out_exactly_them(tmp_path):
    keys = set(flat_keys())
    assert set(run_identity.RESUME_MAY_CHANGE) <= keys, "a listed key that is not a config key is a typo"
    ident = run_identity.identity(tiny(tmp_path).to_flat())
    assert not set(ident) & set(run_identity.RESUME_MAY_CHANGE)
    assert {"model", "model_source", "task", "method", "seed", "lr", "mole.num_experts"} <= set(ident)


# -- 3. Nothing read from disk runs code ---------------------------------------------------------------

class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_plain_refuses_a_crafted_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "trainer_state.pt"
    torch.save({"progress": Exploit(marker)}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_plain(path)
    assert not marker.exists()


def test_every_load_in_the_package_is_plain_data():
    # torch.load only with weights_only=True; no pickle, no yaml.load / unsafe_load, no numpy pickles.
    offenders = []
    for path in (REPO_ROOT / "ldmole").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load" and keywords.get("weights_only") != "True":
                offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load") or (
                    name == "np.load" and keywords.get("allow_pickle") == "True"):
                offenders.append(f"{path}:{node.lineno} {name}")
    assert not offenders, offenders


# -- 4. A crash loses at most the work since the last checkpoint ----------------------------------------


def test_a_checkpoint_without_its_completion_record_is_not_a_checkpoint(tmp_path):
    # A checkpoint assembled and finalised as the trainer does it (no training run needed).
    tmp = checkpointing.new_checkpoint_tmp(tmp_path, 4)
    torch.save({"step": 4}, tmp / checkpointing.STATE_NAME)
    checkpoint = checkpointing.finalize_checkpoint(tmp, 4, {})
    assert checkpoint == tmp_path / "checkpoints" / "step-00000004"
    assert verify_checkpoint(checkpoint) is None and latest_checkpoint(tmp_path) == checkpoint
    (checkpoint / "complete.json").unlink()
    assert "complete.json" in verify_checkpoint(checkpoint)
    assert latest_checkpoint(tmp_path) is None


def test_a_failed_swap_keeps_the_previous_checkpoint_of_that_step(tmp_path, monkeypatch):
    first = checkpointing.new_checkpoint_tmp(tmp_path, 3)
    torch.save({"v": 1}, first / "trainer_state.pt")
    checkpointing.finalize_checkpoint(first, 3, {})
    second = checkpointing.new_checkpoint_tmp(tmp_path, 3)
    torch.save({"v": 2}, second / "trainer_state.pt")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the rename of the new directory into place
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", failing_replace)
    with pytest.raises(OSError):
        checkpointing.finalize_checkpoint(second, 3, {})
    monkeypatch.undo()
    final = tmp_path / "checkpoints" / "step-00000003"
    assert verify_checkpoint(final) is None and torch.load(final / "trainer_state.pt", weights_only=True) == {"v": 1}


def test_pruning_keeps_the_newest_complete_checkpoints_by_step_number(tmp_path):
    for step in (3, 12, 7, 100, 9):
        tmp = checkpointing.new_checkpoint_tmp(tmp_path, step)
        torch.save({"step": step}, tmp / "trainer_state.pt")
        checkpointing.finalize_checkpoint(tmp, step, {})
    root = tmp_path / "checkpoints"
    (root / "step-00000200").mkdir()  # a directory whose write never completed: not a checkpoint, left alone
    (root / ".tmp-step-00000300-crashed").mkdir()  # an interrupted assembly: removed
    checkpointing.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000012", "step-00000100", "step-00000200"]
    checkpointing.prune_checkpoints(tmp_path, keep=1)
    assert checkpointing.latest_checkpoint(tmp_path).name == "step-00000100"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000100", "step-00000200"]


def test_a_checkpoint_written_before_a_key_existed_resumes_when_the_run_keeps_that_keys_default(tmp_path):
    """Keys added later (quantization, replicate, compile) are absent from older checkpoints' identities: they
    ran with the default, so a run at the default resumes them, and a run that sets the key is refused."""
    from ldmole.experiment.run_folder import check_identity
    from ldmole.experiment.run_identity import identity

    config = tiny(tmp_path)
    added = [key for key in ("quantization", "replicate", "compile") if key in identity(config.to_flat())]
    assert added, "the keys this test is about exist"
    old = {key: value for key, value in identity(config.to_flat()).items() if key not in added}
    tmp = checkpointing.new_checkpoint_tmp(tmp_path, 2)
    torch.save({"step": 2}, tmp / checkpointing.STATE_NAME)
    checkpoint = checkpointing.finalize_checkpoint(tmp, 2, {"identity": old, "identity_hash": "written-before"})
    check_identity(checkpoint, config.to_flat())
    quantised = tiny(tmp_path, "quantization=nf4").to_flat()
    with pytest.raises(RunFolderError, match='quantization: checkpoint "none", this run "nf4"'):
        check_identity(checkpoint, quantised)
