"""Run a grid of models x tasks x methods x seeds, one run.sh launch per run.

    python -m ldmole.cli.sweep --models llama3.2_3b --tasks arc_c,arc_e --methods ldmole,mola_8888 \\
        --seeds 42,43,44 --root runs/sweep [--dry-run] [key=value ...]

Each run writes <root>/<model>/<task>/<method>/seed<seed>/ through `bash run.sh` (so single-GPU,
multi-GPU and CPU launching is exactly what run.sh does; NUM_GPUS, MIXED_PRECISION, ... from the
environment still apply). A run whose folder already holds metrics.json is skipped; an unfinished
one starts again with resume=auto (so it continues from its newest checkpoint when runs write
checkpoints, save_every=N, and starts over otherwise). key=value overrides go to every run (after
run.sh's own arguments, so they win); relative paths in them are relative to the repository
root, where run.sh runs. Each run's output goes to sweep.log in its folder. A failed run does not
stop the sweep; failures are listed at the end and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

from ldmole.experiment.data import TASKS
from ldmole.experiment.run_config import available, compose_config, parse_overrides

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
        return (self.output_dir / "metrics.json").is_file()

    def command(self) -> list[str]:
        return ["bash", str(REPO_ROOT / "run.sh"), *self.overrides]

    def shell_line(self) -> str:
        """The command as one copy-pasteable shell line (environment assignments first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command())}"


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
             out=sys.stdout) -> list[tuple[Job, int]]:
    """Runs (or with ``dry_run`` prints) every unfinished job; returns the failed ones with their status."""
    failures: list[tuple[Job, int]] = []
    done = skipped = 0
    for index, job in enumerate(jobs, 1):
        prefix = f"[{index}/{len(jobs)}]"
        if job.finished:
            skipped += 1
            print(f"# {prefix} skip {job.name}: {job.output_dir / 'metrics.json'} exists", file=out)
            continue
        if dry_run:
            print(job.shell_line(), file=out)
            continue
        print(f"{prefix} {job.name} -> {job.output_dir} (log: {LOG_NAME})", file=out, flush=True)
        started = time.time()
        try:
            status = launch(job)
        except KeyboardInterrupt:
            failures.append((job, 130))
            print(f"{prefix} interrupted; the remaining runs are not started", file=out)
            break
        if status == 0 and job.finished:
            done += 1
            print(f"{prefix} done in {time.time() - started:.0f} s", file=out, flush=True)
            continue
        failures.append((job, status))
        reason = f"exit status {status}" if status else "exit status 0 but it wrote no metrics.json"
        print(f"{prefix} FAILED ({reason}); last lines of {job.output_dir / LOG_NAME}:\n"
              f"{_tail(job.output_dir / LOG_NAME)}", file=out, flush=True)
    if dry_run:
        print(f"# dry run: {len(jobs) - skipped} to run, {skipped} skipped (already finished)", file=out)
    else:
        print(f"\nsweep: {done} finished, {skipped} skipped (already finished), {len(failures)} failed", file=out)
        for job, status in failures:
            reason = f"exit status {status}" if status else "wrote no metrics.json"
            print(f"  FAILED {job.name} ({reason}): {job.output_dir / LOG_NAME}", file=out)
    return failures


def main(argv: Optional[Sequence[str]] = None, out=sys.stdout, launch: Callable[[Job], int] = launch) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="comma-separated configs/models names")
    parser.add_argument("--tasks", required=True, help="comma-separated task names (ldmole.experiment.data.TASKS)")
    parser.add_argument("--methods", required=True, help="comma-separated configs/methods names")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (default 42)")
    parser.add_argument("--root", type=Path, default=Path("runs"),
                        help="runs go to ROOT/<model>/<task>/<method>/seed<seed> (default: runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands (and the skipped runs), run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to every run")
    args = parser.parse_intermixed_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]  # ValueError names the bad seed
        jobs = build_jobs(_names(args.models, "models"), _names(args.tasks, "tasks"), _names(args.methods, "methods"),
                          seeds, args.root, args.overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failures = run_jobs(jobs, dry_run=args.dry_run, launch=launch, out=out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
