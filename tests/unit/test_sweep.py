"""ldmole-sweep: the commands of a dry run, skipping finished runs, and carrying on past failures."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def sweep():
    from ldmole.cli import sweep as module

    return module


def run_sweep(sweep, argv, launch=None):
    out = io.StringIO()
    kwargs = {"launch": launch} if launch else {}
    return sweep.main(argv, out=out, **kwargs), out.getvalue()


def parse_line(line: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, command) of one printed shell line."""
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
    return env, [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]


def test_dry_run_prints_one_run_sh_command_per_grid_point(sweep, tmp_path):
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c,rte", "--methods", "ldmole,remole",
                                    "--seeds", "1,2", "--root", str(tmp_path), "--dry-run", "max_steps=5",
                                    "data_dir=/data"])
    assert status == 0
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 * 2 * 2, "expected tasks x methods x seeds commands"
    env, command = parse_line(lines[0])
    assert command == ["bash", str(REPO_ROOT / "run.sh"), "resume=auto", "max_steps=5", "data_dir=/data"], \
        "unfinished runs resume from their newest checkpoint; the user's overrides follow"
    assert env["MODEL"] == "tiny_qwen3" and env["TASK"] == "arc_c" and env["METHOD"] == "ldmole" and env["SEED"] == "1"
    assert env["OUTPUT_DIR"] == str(tmp_path.resolve() / "tiny_qwen3" / "arc_c" / "ldmole" / "seed1")
    assert [parse_line(line)[0]["SEED"] for line in lines[:2]] == ["1", "2"]
    assert "# dry run: 8 to run, 0 skipped" in out
    assert not any(tmp_path.iterdir()), "a dry run must not create run folders"


def finish(sweep, job, *overrides: str) -> None:
    """Writes what a run of ``job`` (with ``overrides`` after its own) leaves: config.yaml and metrics.json."""
    import dataclasses

    import yaml

    from ldmole.experiment.metrics import RunMetrics

    config = sweep.resolved_config(dataclasses.replace(job, overrides=[*job.overrides, *overrides]))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_flat(), sort_keys=False))
    (job.output_dir / "metrics.json").write_text(RunMetrics(job.model, job.task, job.method, job.seed, 0.5).to_json())


def test_finished_runs_are_skipped(sweep, tmp_path):
    jobs = sweep.build_jobs(["tiny_qwen3"], ["arc_c", "rte"], ["ldmole"], [42], tmp_path, [])
    finish(sweep, jobs[0])
    jobs[1].output_dir.mkdir(parents=True)  # started, never finished
    launched = []
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c,rte", "--methods", "ldmole",
                                    "--root", str(tmp_path)], launch=lambda job: launched.append(job.name) or 1)
    assert launched == ["tiny_qwen3/rte/ldmole/seed42"], "only the unfinished run may be launched"
    assert "skip tiny_qwen3/arc_c/ldmole/seed42: finished with these settings" in out
    assert status == 1


def test_a_finished_point_of_other_settings_is_reported_and_rerun_only_with_force(sweep, tmp_path):
    job = sweep.build_jobs(["tiny_qwen3"], ["arc_c"], ["ldmole"], [42], tmp_path, ["lr=0.0005"])[0]
    finish(sweep, job, "lr=0.001")
    launched = []
    argv = ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "ldmole", "--root", str(tmp_path), "lr=0.0005"]
    status, out = run_sweep(sweep, argv, launch=lambda job: launched.append(job) or 0)
    assert status == 1 and not launched, "a metrics.json of another lr must not count as this grid point's"
    assert "MISMATCH tiny_qwen3/arc_c/ldmole/seed42" in out and "lr: saved 0.001, grid 0.0005" in out
    assert "--force" in out
    status, out = run_sweep(sweep, [*argv, "--force"], launch=lambda job: launched.append(job) or 0)
    assert [j.name for j in launched] == ["tiny_qwen3/arc_c/ldmole/seed42"]
    assert launched[0].command()[2:] == ["overwrite=true", "lr=0.0005"], "a forced rerun starts from scratch"


def test_an_unreadable_or_unexplained_metrics_json_is_not_finished(sweep, tmp_path):
    jobs = sweep.build_jobs(["tiny_qwen3"], ["arc_c", "rte"], ["ldmole"], [42], tmp_path, [])
    finish(sweep, jobs[0])
    (jobs[0].output_dir / "metrics.json").write_text('{"model": "tiny_qwen3", "acc')  # torn by a crash
    jobs[1].output_dir.mkdir(parents=True)
    (jobs[1].output_dir / "metrics.json").write_text(
        '{"model": "tiny_qwen3", "task": "rte", "method": "ldmole", "seed": 42, "accuracy": 0.5}')  # no config.yaml
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c,rte", "--methods", "ldmole",
                                    "--root", str(tmp_path)], launch=lambda job: 0)
    assert status == 1 and "skip tiny" not in out
    assert "cannot be checked" in out and "no config.yaml beside it" in out


def test_a_folder_in_use_is_reported_and_left_alone(sweep, tmp_path):
    from ldmole.experiment.run_folder import RunFolder

    job = sweep.build_jobs(["tiny_qwen3"], ["arc_c"], ["ldmole"], [42], tmp_path, [])[0]
    code = ("import sys, time; from ldmole.experiment.run_folder import RunFolder; f = RunFolder(sys.argv[1]); "
            "f.acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(job.output_dir)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        launched = []
        status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "ldmole",
                                        "--root", str(tmp_path)], launch=launched.append)
        assert status == 1 and not launched and "BUSY tiny_qwen3/arc_c/ldmole/seed42" in out
        assert f"pid {holder.pid}" in out
    finally:
        holder.kill()
        holder.wait()
    assert RunFolder(job.output_dir).holder() is None


def test_a_failed_run_does_not_stop_the_sweep_and_is_summarised(sweep, tmp_path):
    def launch(job):
        if job.method == "remole":
            return 3
        job.output_dir.mkdir(parents=True)
        (job.output_dir / "metrics.json").write_text("{}")
        return 0

    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "remole,ldmole,softmax",
                                    "--root", str(tmp_path)], launch=launch)
    assert status == 1, "a sweep with a failure must exit non-zero"
    assert "sweep: 2 finished, 0 skipped (already finished), 1 failed" in out
    assert "FAILED tiny_qwen3/arc_c/remole/seed42 (exit status 3)" in out
    assert (tmp_path / "tiny_qwen3" / "arc_c" / "softmax" / "seed42" / "metrics.json").is_file()


def test_clean_exit_without_metrics_counts_as_failure(sweep, tmp_path):
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "ldmole",
                                    "--root", str(tmp_path)], launch=lambda job: 0)
    assert status == 1 and "wrote no metrics.json" in out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ldmol"], "unknown method 'ldmol'"),
    (["--methods", "ldmole", "seed=3"], "seed is set by the sweep"),
    (["--methods", "ldmole", "max_step=3"], "unknown key 'max_step'"),
])
def test_bad_grids_fail_before_anything_runs(sweep, tmp_path, capsys, argv, message):
    launched = []
    status, _ = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--root", str(tmp_path), *argv],
                          launch=launched.append)
    assert status == 2 and not launched
    assert message in capsys.readouterr().err


def test_a_resume_override_replaces_the_automatic_one(sweep, tmp_path):
    job = sweep.build_jobs(["tiny_qwen3"], ["rte"], ["ldmole"], [7], tmp_path, ["resume="])[0]
    assert job.command()[2:] == ["resume="]


@pytest.mark.parametrize("gpus, processes, per_device", [
    (1, 1, 4), (2, 2, 4), (3, 2, 4), (4, 4, 4), (5, 4, 4), (6, 4, 4), (7, 4, 4), (8, 8, 2)])
def test_run_sh_keeps_the_global_batch_of_16_on_any_gpu_count(gpus, processes, per_device, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake_bin / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "NUM_GPUS": str(gpus)}
    for var in ("BATCH_SIZE", "PER_DEVICE_BATCH_SIZE"):
        env.pop(var, None)
    result = subprocess.run(["bash", "run.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    args = result.stdout.split()
    assert args[args.index("--num_processes") + 1] == str(processes)
    assert f"per_device_batch_size={per_device}" in args
    # What the train command receives composes into a config whose global batch is 16 =
    # processes x per-device batch x the trainer's accumulation, with no remainder.
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.launch import gradient_accumulation
    train_args = args[args.index("ldmole.cli.train") + 1:]
    optim = compose_config(train_args).optim
    assert (optim.batch_size, optim.per_device_batch_size) == (16, per_device)
    accumulation = gradient_accumulation(optim, num_processes=processes)
    assert processes * per_device * accumulation == 16, "the global batch must stay 16"
    assert ("cannot be split evenly over" in result.stderr) == (processes != gpus)


def finishing_launch(record, barrier=None):
    """A launch that (optionally) waits at ``barrier``, records how many launches overlap, and writes metrics."""
    import threading
    import time

    lock = threading.Lock()

    def launch(job):
        with lock:
            record["running"] += 1
            record["peak"] = max(record["peak"], record["running"])
        if barrier is not None:
            barrier.wait()
        time.sleep(0.05)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "metrics.json").write_text("{}")
        record["env"].append(dict(job.env))
        with lock:
            record["running"] -= 1
        return 0
    return launch


def test_jobs_runs_grid_points_at_once_but_never_more_than_asked(sweep, tmp_path, monkeypatch):
    import threading

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    record = {"running": 0, "peak": 0, "env": []}
    # Two launches must be in flight together to pass the barrier; one at a time would break it.
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "ldmole,remole",
                                    "--root", str(tmp_path / "a"), "--jobs", "2"],
                            launch=finishing_launch(record, threading.Barrier(2, timeout=10)))
    assert status == 0 and record["peak"] == 2
    assert "sweep: 2 finished, 0 skipped (already finished), 0 failed" in out
    assert all(int(env["OMP_NUM_THREADS"]) >= 1 for env in record["env"]), "parallel runs share the CPU cores"

    record = {"running": 0, "peak": 0, "env": []}
    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c,rte", "--methods", "ldmole,remole,softmax",
                                    "--root", str(tmp_path / "b"), "--jobs", "3"], launch=finishing_launch(record))
    assert status == 0 and record["peak"] <= 3 and len(record["env"]) == 6


def test_parallel_failures_are_listed_in_grid_order(sweep, tmp_path):
    def launch(job):
        return 5 if job.method != "softmax" else 0

    status, out = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "remole,ldmole,softmax",
                                    "--root", str(tmp_path), "--jobs", "3"], launch=launch)
    assert status == 1
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("  FAILED")]
    assert listed == ["tiny_qwen3/arc_c/remole/seed42", "tiny_qwen3/arc_c/ldmole/seed42",
                      "tiny_qwen3/arc_c/softmax/seed42"], "exit 0 without metrics.json is a failure too"


def test_thread_budget_splits_the_cores_unless_the_environment_sets_it(sweep, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert sweep.thread_budget(1, cpu_count=16) == {}
    assert sweep.thread_budget(4, cpu_count=16) == {"OMP_NUM_THREADS": "4"}
    assert sweep.thread_budget(8, cpu_count=2) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sweep.thread_budget(4, cpu_count=16) == {}


def test_jobs_below_one_is_refused(sweep, tmp_path, capsys):
    status, _ = run_sweep(sweep, ["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "ldmole",
                                  "--root", str(tmp_path), "--jobs", "0"], launch=lambda job: 0)
    assert status == 2 and "--jobs 0" in capsys.readouterr().err
