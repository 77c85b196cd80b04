"""Run a grid of models x tasks x methods x seeds, one run.sh launch per run.

    python -m ldmole.cli.sweep --models llama3.2_3b --tasks arc_c,arc_e --methods ldmole,mola_8888 \\
        --seeds 42,43,44 --root runs/sweep [--jobs N] [--dry-run] [key=value ...]

Each run writes <root>/<model>/<task>/<method>/seed<seed>/ through `bash run.sh` (so single-GPU,
multi-GPU and CPU launching is exactly what run.sh does; NUM_GPUS, MIXED_PRECISION, ... from the
environment still apply). key=value overrides go to every run (after run.sh's own arguments, so they
win); relative paths in them are relative to the repository root, where run.sh runs. Modules named by
imports=... are imported here too, so --tasks and mole.router= may name what they register. Each run's
output goes to sweep.log in its folder. A failed run does not stop the sweep; failures are listed at
the end and the exit status is 1.

A grid point whose folder holds metrics.json is finished, and skipped, only when the config.yaml
beside it equals the config run.sh would launch now on every key that changes what a run computes
(all but ldmole.experiment.run_identity.BOOKKEEPING_KEYS). Otherwise it is reported as a mismatch,
naming each differing key, and not run (exit status 1); --force reruns such points from scratch
(overwrite=true). An unfinished point starts with resume=auto: it continues from its newest
checkpoint when the run wrote checkpoints (save_every=N) and starts over otherwise; a folder of
another run is refused by the run itself. A folder in use by another process is reported and left.

--jobs N runs N grid points at once (default 1). Every run still goes through run.sh, so on a GPU
machine each one uses the GPUs run.sh picks (set NUM_GPUS=1 for N runs sharing one GPU). It pays
where one run cannot fill the machine: a small model such as SmolLM2-135M issues many small kernels
and leaves a large GPU mostly idle. Each run then gets OMP_NUM_THREADS = CPU cores // N unless the
environment sets it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

from ldmole.experiment.data import TASKS
from ldmole.experiment.metrics import METRICS_NAME, RunMetrics
from ldmole.experiment.run_config import RunConfig, available, compose_config, import_modules, parse_overrides
from ldmole.experiment.run_folder import RunFolder, saved_config_differences
from ldmole.experiment.run_identity import describe_differences

# Keys the sweep sets per run; an override of one of them would put every run in one folder.
GRID_KEYS = ("model", "task", "method", "seed", "output_dir")
LOG_NAME = "sweep.log"


@dataclass
class Job:
    """One run of the grid: its settings, its folder and the environment and arguments for run.sh."""

    model: str
    task: str
    method: str
    seed: int
    output_dir: Path
    env: dict[str, str]
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{self.model}/{self.task}/{self.method}/seed{self.seed}"

    @property
    def finished(self) -> bool:
        """Whether the folder holds a metrics.json (of whichever settings: see :func:`saved_state`)."""
        return (self.output_dir / METRICS_NAME).is_file()

    def command(self) -> list[str]:
        return ["bash", str(REPO_ROOT / "run.sh"), *self.overrides]

    def forced(self) -> "Job":
        """The job rerun from scratch: ``overwrite=true`` instead of any ``resume``."""
        overrides = [item for item in self.overrides if not item.startswith("resume=")]
        return Job(self.model, self.task, self.method, self.seed, self.output_dir, self.env,
                   ["overwrite=true", *overrides])

    def shell_line(self) -> str:
        """The command as one copy-pasteable shell line (environment assignments first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command())}"


def resolved_config(job: Job) -> RunConfig:
    """The config run.sh would launch ``job`` with now: its arguments from the environment (GPU count,
    precision, per-device batch) and the job's, as run.sh prints them with LDMOLE_PRINT_ARGS=1.

    Raises:
        ValueError: run.sh refused the settings (its message).
    """
    env = {**os.environ, **job.env, "LDMOLE_PRINT_ARGS": "1"}
    if "NUM_GPUS" not in env:
        import torch

        env["NUM_GPUS"] = str(torch.cuda.device_count())
    result = subprocess.run(job.command(), env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise ValueError(f"run.sh refused {job.name}: {result.stderr.strip()[-500:]}")
    return compose_config([arg for arg in result.stdout.split("\0") if arg])


def saved_state(job: Job) -> tuple[str, str]:
    """("todo" | "finished" | "mismatch" | "busy", why) of a grid point's folder before the sweep runs it."""
    holder = RunFolder(job.output_dir).holder()
    if holder is not None:
        return "busy", f"{job.output_dir} is in use by {holder}"
    metrics = job.output_dir / METRICS_NAME
    if not metrics.is_file():
        return "todo", ""
    try:
        RunMetrics.read(metrics)
        diffs = saved_config_differences(job.output_dir, resolved_config(job).to_flat())
    except (ValueError, OSError) as error:  # RunFolderError is a ValueError
        return "mismatch", f"{metrics} cannot be checked ({error})"
    if diffs is None:
        return "mismatch", f"{metrics} has no config.yaml beside it to compare with the grid's settings"
    if diffs:
        return "mismatch", f"{metrics} comes from other settings ({describe_differences(diffs, 'saved', 'grid')})"
    return "finished", ""


def _names(text: str, kind: str) -> list[str]:
    """A comma-separated list of names, each checked against configs/<kind>/ (tasks: the task registry)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    valid = list(TASKS) if kind == "tasks" else available(kind)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {kind[:-1]} {', '.join(map(repr, unknown))}; choose from {', '.join(valid)}")
    return names


def build_jobs(models: Sequence[str], tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
               root: Path, overrides: Sequence[str]) -> list[Job]:
    """Every grid point as a Job, in model, task, method, seed order.

    Each point's config is composed now, so an unknown key or an invalid setting fails before
    anything runs.

    Raises:
        ValueError: an override sets one of the grid keys, or a composed config is invalid.
    """
    parsed = parse_overrides(overrides)
    clash = [k for k in parsed if k in GRID_KEYS]
    if clash:
        raise ValueError(f"{', '.join(clash)} is set by the sweep for each run; "
                         "use --models/--tasks/--methods/--seeds/--root")
    if "resume" not in parsed:
        overrides = ["resume=auto", *overrides]  # an interrupted run continues from its newest checkpoint, if any
    root = root.resolve()
    jobs = []
    for model in models:
        for task in tasks:
            for method in methods:
                for seed in seeds:
                    output_dir = root / model / task / method / f"seed{seed}"
                    compose_config({**parsed, "model": model, "task": task, "method": method, "seed": seed,
                                    "output_dir": str(output_dir)})  # fail on a bad grid point before any run
                    env = {"MODEL": model, "TASK": task, "METHOD": method, "SEED": str(seed),
                           "OUTPUT_DIR": str(output_dir)}
                    jobs.append(Job(model, task, method, seed, output_dir, env, list(overrides)))
    return jobs


def launch(job: Job) -> int:
    """Runs one job with run.sh, its output in <output_dir>/sweep.log; returns the exit status."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with open(job.output_dir / LOG_NAME, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {job.shell_line()}\n")
        log.flush()
        return subprocess.run(job.command(), env={**os.environ, **job.env}, cwd=REPO_ROOT,
                              stdout=log, stderr=subprocess.STDOUT).returncode


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_jobs(jobs: Sequence[Job], dry_run: bool = False, launch: Callable[[Job], int] = launch,
             out=sys.stdout, parallel: int = 1, force: bool = False) -> list[tuple[Job, object]]:
    """Runs (or with ``dry_run`` prints) every unfinished job, ``parallel`` at a time, in grid order;
    returns the failed ones with their status (an exit status, or the reason a point was not run:
    a mismatch without ``force``, a folder in use), in grid order."""
    todo: list[tuple[str, Job]] = []
    skipped, refused, to_run = 0, [], 0
    for index, job in enumerate(jobs, 1):
        prefix = f"[{index}/{len(jobs)}]"
        state, why = saved_state(job)
        if state == "finished":
            skipped += 1
            print(f"# {prefix} skip {job.name}: finished with these settings ({job.output_dir / METRICS_NAME})",
                  file=out)
            continue
        if state == "busy" or (state == "mismatch" and not force):
            refused.append((job, why))
            hint = "; --force reruns it from scratch" if state == "mismatch" else "; not started"
            print(f"# {prefix} {state.upper()} {job.name}: {why}{hint}", file=out)
            continue
        job = job.forced() if state == "mismatch" else job
        to_run += 1
        if dry_run:
            print(job.shell_line(), file=out)
        else:
            todo.append((prefix, job))
    if dry_run:
        print(f"# dry run: {to_run} to run, {skipped} "
              f"skipped (already finished), {len(refused)} not run (mismatch or in use)", file=out)
        return refused

    lock = threading.Lock()
    stop = threading.Event()  # set by Ctrl-C: runs not yet started are not started

    def say(text: str) -> None:
        with lock:
            print(text, file=out, flush=True)

    def run_one(prefix: str, job: Job) -> Optional[int]:
        """The job's exit status, or None when it was never started (the sweep was interrupted)."""
        if stop.is_set():
            return None
        say(f"{prefix} {job.name} -> {job.output_dir} (log: {LOG_NAME})")
        started = time.time()
        try:
            status = launch(job)
        except KeyboardInterrupt:
            stop.set()
            say(f"{prefix} interrupted; the remaining runs are not started")
            return 130
        if status == 0 and job.finished:
            say(f"{prefix} done in {time.time() - started:.0f} s")
            return 0
        reason = f"exit status {status}" if status else "exit status 0 but it wrote no metrics.json"
        say(f"{prefix} FAILED ({reason}); last lines of {job.output_dir / LOG_NAME}:\n"
            f"{_tail(job.output_dir / LOG_NAME)}")
        return status

    if parallel == 1:
        statuses = []
        for prefix, job in todo:
            statuses.append(run_one(prefix, job))
            if stop.is_set():
                break
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(run_one, prefix, job) for prefix, job in todo]
            try:
                statuses = [future.result() for future in futures]
            except KeyboardInterrupt:
                stop.set()
                say("interrupted; the remaining runs are not started (runs under way get the interrupt too)")
                statuses = [future.result() for future in futures]
    failures = [(job, status) for (_, job), status in zip(todo, statuses) if status is not None and
                not (status == 0 and job.finished)]
    done = sum(1 for (_, job), status in zip(todo, statuses) if status == 0 and job.finished)
    print(f"\nsweep: {done} finished, {skipped} skipped (already finished), {len(failures)} failed, "
          f"{len(refused)} not run (mismatch or in use)", file=out)
    for job, status in failures:
        reason = f"exit status {status}" if status else "wrote no metrics.json"
        print(f"  FAILED {job.name} ({reason}): {job.output_dir / LOG_NAME}", file=out)
    for job, why in refused:
        print(f"  NOT RUN {job.name}: {why}", file=out)
    order = {job.name: i for i, job in enumerate(jobs)}
    return sorted(failures + refused, key=lambda item: order[item[0].name])


def thread_budget(parallel: int, cpu_count: Optional[int] = None) -> dict[str, str]:
    """The environment each of ``parallel`` concurrent runs gets: OMP_NUM_THREADS = cores // parallel
    (at least 1), unless the environment already sets it or runs go one at a time."""
    if parallel == 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // parallel))}


def main(argv: Optional[Sequence[str]] = None, out=sys.stdout, launch: Callable[[Job], int] = launch) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="comma-separated configs/models names")
    parser.add_argument("--tasks", required=True, help="comma-separated task names (ldmole.experiment.data.TASKS)")
    parser.add_argument("--methods", required=True, help="comma-separated configs/methods names")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (default 42)")
    parser.add_argument("--root", type=Path, default=Path("runs"),
                        help="runs go to ROOT/<model>/<task>/<method>/seed<seed> (default: runs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (default 1); see the module help for when more pays")
    parser.add_argument("--dry-run", action="store_true", help="print the commands (and the skipped runs), run nothing")
    parser.add_argument("--force", action="store_true",
                        help="rerun from scratch (overwrite=true) the points whose metrics.json came from other "
                             "settings; finished points of the same settings are still skipped")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to every run")
    args = parser.parse_intermixed_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]  # ValueError names the bad seed
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: run at least 1 job at a time")
        import_modules(parse_overrides(args.overrides).get("imports"))  # so --tasks may name a task they register
        jobs = build_jobs(_names(args.models, "models"), _names(args.tasks, "tasks"), _names(args.methods, "methods"),
                          seeds, args.root, args.overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for job in jobs:
        job.env.update(thread_budget(args.jobs))
    failures = run_jobs(jobs, dry_run=args.dry_run, launch=launch, out=out, parallel=args.jobs, force=args.force)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
