"""scripts/study_smollm2.sh: the sweeps each stage launches (python replaced by a stub that prints its arguments)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "study_smollm2.sh"


def run_script(tmp_path, *stages, **env):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (stub / "python").chmod(0o755)
    full_env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "NUM_GPUS": "0", "ROOT": str(tmp_path / "study"),
                **env}
    return subprocess.run(["bash", str(SCRIPT), *stages], env=full_env, capture_output=True, text=True, timeout=60)


def sweeps(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("python -m ldmole.cli.sweep")]


def test_headline_runs_six_methods_on_three_seeds_at_one_budget(tmp_path):
    result = run_script(tmp_path, "headline", DATA_DIR="/data", JOBS="4")
    assert result.returncode == 0, result.stderr
    [line] = sweeps(result.stdout)
    assert "--tasks cola --methods ldmole,ldmole_reference,lora,softmax,mola_2468,remole --seeds 42,43,44" in line
    for setting in ("data_dir=/data", "max_steps=250", "lr=5e-4", "selection_size=200", "--jobs 4"):
        assert setting in line


def test_ablations_tune_the_sparsity_coefficient_each_in_its_own_root(tmp_path):
    result = run_script(tmp_path, "ablations", DATA_DIR="/data", SPARSITY_COEFS="1 10")
    lines = sweeps(result.stdout)
    assert len(lines) == 4
    assert "--methods ldmole_sparse_k2" in lines[0] and lines[0].endswith("sparsity_coef=1")
    assert f"--root {tmp_path}/study/sparsity_coef_10" in lines[1]
    assert "--methods mola_8888" in lines[2]
    assert "--methods sparsegen_fixed" in lines[3] and lines[3].endswith("mole.fixed_lambda=-1.589"), \
        "the fixed-λ ablation runs at the constant the reference initialisation trains, not the method file's 0.5"


def test_default_coefficients_are_the_studys(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSITY_COEFS", raising=False)
    result = run_script(tmp_path, "ablations", DATA_DIR="/data")
    coefs = [line.rsplit("sparsity_coef=", 1)[1] for line in sweeps(result.stdout) if "ldmole_sparse_k2" in line]
    assert coefs == ["0.03", "0.1", "0.3", "1"], "docs/study_smollm2.md ran these four"


def test_calibration_doubles_the_budget_and_extra_overrides_come_last(tmp_path):
    result = run_script(tmp_path, "calibration", DATA_DIR="/data", EXTRA="max_steps=2 eval_max_examples=8")
    [line] = sweeps(result.stdout)
    assert "--tasks mrpc,rte --methods lora" in line
    words = line.split()
    assert words.index("max_steps=250") < words.index("max_steps=500") < words.index("max_steps=2"), \
        "the stage's budget overrides the common one, and EXTRA overrides both"


def test_figures_plot_every_finished_seed42_run_where_its_stage_wrote_it(tmp_path):
    study = tmp_path / "study"
    cola = study / "smollm2_135m" / "cola"
    finished = [cola / "ldmole" / "seed42", cola / "mola_8888" / "seed42",
                study / "fixed_lambda_-1.589" / "smollm2_135m" / "cola" / "sparsegen_fixed" / "seed42",
                study / "sparsity_coef_0.1" / "smollm2_135m" / "cola" / "ldmole_sparse_k2" / "seed42"]
    for run in finished:
        run.mkdir(parents=True)
        (run / "metrics.json").write_text("{}")
        (run / "config.yaml").write_text("{}")
    result = run_script(tmp_path, "figures", DATA_DIR="/data", SPARSITY_COEFS="0.1")
    assert result.returncode == 0, result.stderr
    plotted = {run: (run / "plot_routing.log").read_text() for run in finished if (run / "plot_routing.log").exists()}
    assert set(plotted) == set(finished), f"not plotted: {sorted(map(str, set(finished) - set(plotted)))}"
    assert all(text.startswith(f"python -m ldmole.cli.plot_routing {run} ") for run, text in plotted.items())
    assert (cola / "ldmole" / "seed42" / "plot_routing--at-init.log").exists()
    assert "skip figures of" in result.stderr and "ldmole_reference" in result.stderr


@pytest.mark.parametrize("env, stage, message", [
    ({}, "headline", "set DATA_DIR"),
    ({"DATA_DIR": "/data"}, "everything", "unknown stage 'everything'"),
])
def test_bad_settings_stop_with_a_message(tmp_path, env, stage, message):
    result = run_script(tmp_path, stage, **env)
    assert result.returncode != 0 and message in result.stderr
