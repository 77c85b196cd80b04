"""run.sh and ldmole-sweep as commands: the settings run.sh passes, and a launch's environment and log."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def sweep():
    from ldmole.cli import sweep as module

    return module


@pytest.mark.slow
def test_run_sh_passes_only_the_settings_that_are_set(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake_bin / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "NUM_GPUS": "0", "MODEL": "llama3.1_8b"}
    for var in ("NUM_EPOCHS", "LR", "BATCH_SIZE", "SPARSITY_K"):
        env.pop(var, None)
    args = subprocess.run(["bash", "run.sh", "max_steps=5"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout.split()
    assert args[:2] == ["-m", "ldmole.cli.train"] and "model=llama3.1_8b" in args and args[-1] == "max_steps=5"
    assert not any(a.startswith(("num_epochs=", "lr=", "batch_size=")) for a in args), \
        "unset run.sh settings must leave the config files' values (llama3.1_8b trains 3 epochs)"
    env["NUM_EPOCHS"] = "1"
    args = subprocess.run(["bash", "run.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.split()
    assert "num_epochs=1" in args


@pytest.mark.slow
def test_launch_passes_the_environment_and_logs_to_the_run_folder(sweep, tmp_path, monkeypatch):
    job = sweep.build_jobs(["tiny_qwen3"], ["rte"], ["ldmole"], [7], tmp_path, ["max_steps=1"])[0]
    echo = ["bash", "-c", 'echo "$MODEL $TASK $SEED $OUTPUT_DIR"; exit 4']
    monkeypatch.setattr(sweep.Job, "command", lambda self: echo)
    assert sweep.launch(job) == 4
    log = (job.output_dir / sweep.LOG_NAME).read_text()
    assert f"tiny_qwen3 rte 7 {job.output_dir}" in log, "run.sh must see the run's settings in its environment"
