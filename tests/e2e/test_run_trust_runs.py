"""Trustworthy runs, in real tiny training runs: one run per folder, a resume continues only its own run,
nothing read from disk runs code, and a crash loses at most the work since the last checkpoint
(docs/runs.md: Failure modes; the checks without a run are in tests/unit/test_run_trust.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ldmole.core.adapter_io import sha256_file
from ldmole.experiment.checkpointing import CheckpointError, latest_checkpoint
from ldmole.experiment.run_config import RunConfig, compose_config
from ldmole.experiment.run_folder import RunFolderError
from ldmole.experiment.trainer import train
from tests.helpers import tiny_run

TINY = ("train_max_examples=64", "eval_max_examples=16", "batch_size=4",
                          "per_device_batch_size=4", "mole.num_experts=4",)  # settings every tiny run of this file shares


def tiny(tmp: Path, *extra: str) -> RunConfig:
    return compose_config(tiny_run(*TINY, "method=ldmole", f"output_dir={tmp}", *extra))


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("wall_time_s", "resumed_from")}


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# -- 1. A run folder holds one run --------------------------------------------------------------------

@pytest.mark.slow
def test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it_whole(tmp_path):
    train(tiny(tmp_path, "max_steps=6", "save_every=2"))
    before = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds") as error:
        train(tiny(tmp_path, "seed=9", "max_steps=2", "save_every=1"))
    assert "resume=auto" in str(error.value) and "overwrite=true" in str(error.value)
    after = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".lock"} == \
           {k: v for k, v in before.items() if k.name != ".lock"}, "a refused run must not touch the folder"

    train(tiny(tmp_path, "seed=9", "max_steps=2", "save_every=1", "overwrite=true"))
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-00000001"], "the old run's checkpoints must be gone, the new run's kept"
    assert metrics_of(tmp_path)["seed"] == 9 and metrics_of(tmp_path)["steps"] == 2


@pytest.mark.slow
def test_overwrite_removes_the_old_results_before_anything_is_written(tmp_path):
    train(tiny(tmp_path, "max_steps=2"))
    assert metrics_of(tmp_path)["seed"] == 42
    # The new run dies (non-finite loss): the folder must not pair its config with the old run's results.
    with pytest.raises(Exception, match="non-finite"):
        train(tiny(tmp_path, "seed=9", "lr=1e30", "max_steps=4", "log_every=1", "overwrite=true"))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "adapter").exists()
    assert "seed: 9" in (tmp_path / "config.yaml").read_text()
    assert not (tmp_path / "running.json").exists(), "the running marker goes when the run ends, even by an error"


# -- 2. A resume continues only its own run ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """An arc_c, seed 42 run of 6 steps with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("saved")
    train(tiny(folder, "max_steps=6", "save_every=2"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("other, named", [
    (["task=arc_e", "seed=7"], ['task: checkpoint "arc_c", this run "arc_e"', "seed: checkpoint 42, this run 7"]),
    (["lr=0.001"], ["lr: checkpoint 0.0001, this run 0.001"]),
    (tiny_run(model="tiny_llama"), ['model: checkpoint "tiny_qwen3", this run "tiny_llama"',
                                          'model_source: checkpoint "random:qwen3", this run "random:llama"']),
], ids=["other_task_and_seed", "other_lr", "other_model"])
def test_a_resume_refuses_a_checkpoint_of_another_run_naming_each_key(saved_run, tmp_path, other, named):
    checkpoint = saved_run / "checkpoints" / "step-00000004"
    with pytest.raises(RunFolderError) as error:
        train(compose_config(tiny_run(*TINY, "method=ldmole", *other, f"resume={checkpoint}", f"output_dir={tmp_path / 'x'}")))
    for fragment in named:
        assert fragment in str(error.value), f"{fragment!r} missing from: {error.value}"
    assert not (tmp_path / "x" / "metrics.json").exists()


@pytest.mark.slow
def test_a_resume_may_change_only_where_the_run_stops_and_how_it_logs(saved_run, tmp_path):
    # Branch the saved run from its step-2 checkpoint with other bookkeeping: it ends as the original did.
    checkpoint = saved_run / "checkpoints" / "step-00000002"
    branch = tmp_path / "branch"
    train(tiny(branch, "max_steps=6", f"resume={checkpoint}", "log_every=3", "keep_checkpoints=1", "save_every=4"))
    assert comparable(metrics_of(branch)) == comparable(metrics_of(saved_run))


# -- 3. Nothing read from disk runs code ---------------------------------------------------------------

class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["trainer_state.pt", "rng_rank0.pt"])
def test_a_crafted_checkpoint_given_as_resume_is_refused_and_runs_nothing(saved_run, tmp_path, victim):
    # The attacker controls the whole folder, complete.json's hashes included.
    import shutil

    crafted = tmp_path / "step-00000004"
    shutil.copytree(saved_run / "checkpoints" / "step-00000004", crafted)
    marker = tmp_path / "pwned"
    torch.save({"payload": Exploit(marker)}, crafted / victim)
    record = json.loads((crafted / "complete.json").read_text())
    record["files"][victim] = {"bytes": (crafted / victim).stat().st_size,
                               "sha256": sha256_file(crafted / victim)}
    (crafted / "complete.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="refused to load"):
        train(tiny(tmp_path / "out", "max_steps=6", f"resume={crafted}"))
    assert not marker.exists(), "nothing in a checkpoint may run code"


# -- 4. A crash loses at most the work since the last checkpoint ----------------------------------------

@pytest.mark.slow
def test_a_torn_last_log_line_is_dropped_with_a_warning_naming_the_file(tmp_path):
    train(tiny(tmp_path, "max_steps=4", "save_every=2", "log_every=1"))
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "epoch": 1, "ta')  # a crash mid-write
    with pytest.warns(UserWarning, match=rf"{log}: dropped its unparsable last line"):
        train(tiny(tmp_path, "max_steps=6", "save_every=2", "log_every=1", "resume=auto"))
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries if "lr" in e] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_and_says_which(saved_run, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(saved_run, folder)
    (folder / "metrics.json").unlink()  # an unfinished run whose newest checkpoint was torn by a crash
    weights = folder / "checkpoints" / "step-00000004" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"resuming from \S+step-00000002; passed over newer: .*step-00000004"):
        train(tiny(folder, "max_steps=6", "save_every=2", "resume=auto"))
    assert comparable(metrics_of(folder)) == comparable(metrics_of(saved_run)), \
        "resuming from the older checkpoint must end as the uninterrupted run"


@pytest.mark.slow
def test_each_step_is_checkpointed_once_with_the_umask_permissions(tmp_path, monkeypatch):
    from ldmole.experiment import trainer

    made = []
    real = trainer.new_checkpoint_tmp
    monkeypatch.setattr(trainer, "new_checkpoint_tmp", lambda out, step: made.append(step) or real(out, step))
    old = os.umask(0o022)
    try:
        # 64 examples at batch 4: 16 steps per epoch; save_every=4 divides it, so the epoch's last step
        # is both a save_every step and an epoch end.
        train(tiny(tmp_path, "num_epochs=2", "max_steps=20", "save_every=4", "keep_checkpoints=3"))
    finally:
        os.umask(old)
    assert made == [4, 8, 12, 16, 20][:len(made)] and len(made) == len(set(made)), made
    newest = latest_checkpoint(tmp_path)
    assert newest.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in newest.iterdir())


@pytest.mark.slow
def test_a_resume_refuses_a_checkpoint_of_another_base_model_revision(saved_run, tmp_path, monkeypatch):
    import shutil

    from ldmole.experiment.run import Run

    folder = tmp_path / "run"
    shutil.copytree(saved_run, folder)
    (folder / "metrics.json").unlink()
    record_path = folder / "checkpoints" / "step-00000004" / "complete.json"
    record = json.loads(record_path.read_text())
    record["base_model_revision"] = "0123abc"  # the hub commit the run was trained on
    record_path.write_text(json.dumps(record))
    build = Run.base_model

    def at_other_revision(run):
        model = build(run)
        model.config._commit_hash = "4567def"  # the hub's newer commit of the same repository
        return model

    monkeypatch.setattr(Run, "base_model", at_other_revision)
    with pytest.raises(CheckpointError, match="at revision 0123abc, but the base model loaded now is at 4567def"):
        train(tiny(folder, "max_steps=6", "save_every=2", "resume=auto"))
