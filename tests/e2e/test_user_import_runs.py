"""The imports= key in commands: ldmole-train runs a router from a file of the user's, and
scripts/train.py is ldmole-train from any folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_command, tiny_run
from tests.unit.test_user_imports import restore_registries, write_router  # noqa: F401 (autouse fixture)


@pytest.mark.slow
def test_ldmole_train_runs_a_router_from_a_file_of_the_users(tmp_path):
    module = write_router(tmp_path, "user_top1_g")
    args = tiny_run("method=softmax", "mole.router=user_top1_g", f"imports=[{module}]", "max_steps=2",
                              "batch_size=1", "per_device_batch_size=1", "eval_max_examples=4",
                              f"output_dir={tmp_path / 'run'}")
    result = run_command("ldmole.cli.train", args)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["imports"] == [module] and saved["mole"]["router"] == "user_top1_g"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["routing"]["avg_active_experts"] == pytest.approx(1.0), "top-1 routing: one expert per token"

    refused = run_command("ldmole.cli.evaluate", [str(tmp_path / "run")])
    assert refused.returncode != 0 and f"LDMOLE_IMPORTS={module}" in refused.stderr, \
        "reading the run back must not import its modules, and must say how to"
    evaluated = subprocess.run([sys.executable, "-m", "ldmole.cli.evaluate", str(tmp_path / "run")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "LDMOLE_IMPORTS": module})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "reproduces metrics.json" in evaluated.stdout


@pytest.mark.slow
def test_scripts_train_py_is_ldmole_train_from_any_folder(tmp_path):
    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    helped, module = script("--help"), run_command("ldmole.cli.train", ["--help"], timeout=120)
    assert helped.returncode == 0 and helped.stdout == module.stdout, "scripts/train.py must print ldmole-train's help"
    refused = script("max_step=3")
    assert refused.returncode == 2 and "unknown key 'max_step' (did you mean 'max_steps'" in refused.stderr
