"""Results tables in the paper's layout: every ``metrics.json`` under a folder -> one table per model.

Rows are methods (ours, then the published numbers of docs/method.md §5 and ours − published where the
paper has that row), columns are the paper's nine tasks, the average and the mean number of active
experts. A cell is the mean accuracy (%) over the seeds found, "± std (n=…)" when there are several;
a task without runs stays missing ("—"), it is never filled in.

Averages: ``Avg`` is the mean over all nine tasks and is shown only for rows that have all nine
(so it compares with the paper's Avg). When some row of a table lacks a task, the table also gets
"Avg (shared)": the mean over the tasks that every one of our rows in that table has (named in a
footnote), with the published numbers averaged over the same tasks. No row is ever averaged over
a different task set than the row it is compared with.

Per-task tables (:func:`task_tables`, ``tasks.md``) give what a small study needs to tell methods
from noise, for every task run (also those outside the paper's columns): per method the seeds, the
accuracy mean ± sample std, the standard error of that mean over seeds, the binomial standard error
of one run's accuracy on the split, the task's own metric (MCC for CoLA, F1 for MRPC), the share of
the most frequent predicted answer (1.00 = a constant answer), active experts and wall time; and a
"majority class" row: the accuracy of always answering the most frequent gold label, from which each
method's margin is given in binomial standard errors, sqrt(p (1 - p) / N) at the majority rate p.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import yaml

from ..experiment.data.tasks import TASKS as REGISTERED_TASKS
from ..experiment.data.tasks import get_task
from ..experiment.metrics import METRICS_NAME, RunMetrics

__all__ = ["TASK_COLUMNS", "METHOD_LABELS", "PUBLISHED", "FULL_EVAL_SIZES", "RunResult", "Cell", "ModelTable",
           "collect_runs", "build_tables", "format_markdown", "write_tables", "TaskRow", "TaskTable", "task_tables",
           "format_task_markdown"]

# The paper's nine tasks, in its order; (task config name, column title), the title from the task's spec.
PAPER_TASKS = ("mmlu_pro", "arc_c", "arc_e", "obqa", "csqa", "swag", "hellaswag", "cola", "rte")
TASK_COLUMNS: list[tuple[str, str]] = [(task, get_task(task).title) for task in PAPER_TASKS]
TASKS = [task for task, _ in TASK_COLUMNS]

# Method config name -> row label; the paper's four first, in its order, then our extra baselines.
METHOD_LABELS: dict[str, str] = {
    "mola_8888": "MoLA 8888", "mola_2468": "MoLA 2468", "remole": "ReMoLE", "ldmole": "LD-MoLE",
    "ldmole_sparse_k2": "LD-MoLE + sparsity (k=2)", "ldmole_reference": "LD-MoLE (reference init)",
    "ldmole_released": "LD-MoLE (release before 2026-02-25: fixed λ)", "softmax": "MoLE (softmax)",
    "sparsegen_fixed": "Sparsegen (fixed λ)", "lora": "LoRA",
}

# docs/method.md §5, typed in: accuracy % per task, and the paper's own Avg. Keyed by model config name, then by
# the method whose runs replicate the published row: the paper's LD-MoLE ran the authors' release, whose λ-MLP
# initialisation is `ldmole_reference`'s (`ldmole` starts the λ-MLP live, docs/faithfulness.md), so the published
# LD-MoLE numbers sit under `ldmole_reference`.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "llama3.2_3b": {
        "mola_8888": {"mmlu_pro": 40.3, "arc_c": 71.6, "arc_e": 83.5, "obqa": 81.0, "csqa": 79.8,
                      "swag": 83.6, "hellaswag": 87.5, "cola": 85.8, "rte": 90.6, "avg": 78.2},
        "mola_2468": {"mmlu_pro": 42.31, "arc_c": 71.91, "arc_e": 83.9, "obqa": 83.6, "csqa": 80.0,
                      "swag": 84.0, "hellaswag": 87.31, "cola": 86.0, "rte": 89.5, "avg": 78.72},
        "remole": {"mmlu_pro": 48.01, "arc_c": 75.25, "arc_e": 89.3, "obqa": 83.4, "csqa": 79.5,
                   "swag": 90.5, "hellaswag": 93.44, "cola": 84.0, "rte": 89.5, "avg": 81.42},
        "ldmole_reference": {"mmlu_pro": 49.58, "arc_c": 74.58, "arc_e": 89.5, "obqa": 83.8, "csqa": 80.3,
                             "swag": 90.8, "hellaswag": 93.60, "cola": 85.5, "rte": 91.0, "avg": 82.05},
    },
    "llama3.1_8b": {
        "ldmole_reference": {"mmlu_pro": 55.98, "arc_c": 83.7, "arc_e": 91.6, "obqa": 88.0, "csqa": 83.0,
                             "swag": 92.29, "hellaswag": 95.45, "cola": 85.3, "rte": 91.3, "avg": 85.18},
    },
}

# Size of each task's evaluation split under the default protocol (its spec's eval_size; docs/method.md §4;
# MMLU-Pro: its 10% test carve). A run scored on fewer examples (eval_max_examples) is marked in the table.
FULL_EVAL_SIZES: dict[str, int] = {name: spec.eval_size for name, spec in REGISTERED_TASKS.items() if spec.eval_size}
# The task metrics a per-task table shows (a task's spec names its extra metrics), as the table names them.
METRIC_TITLES = {"mcc": "MCC", "f1": "F1"}

MISSING = "—"
SUBSET_MARK = "†"
# Settings that may differ between the runs averaged into one cell.
PER_RUN_KEYS = {"seed", "output_dir"}


@dataclass
class RunResult:
    """What one finished run contributes: its identity, accuracy (%), routing summary and settings."""

    path: Path
    model: str
    task: str
    method: str
    seed: int
    accuracy: float
    num_eval_examples: Optional[int]
    avg_active_experts: Optional[float]
    protocol: Optional[str]
    config: dict = field(default_factory=dict)
    task_metric: Optional[tuple[str, float]] = None       # ("MCC", value) for CoLA, ("F1", value) for MRPC
    label_counts: Optional[dict[str, int]] = None
    prediction_counts: Optional[dict[str, int]] = None
    wall_time_s: Optional[float] = None


@dataclass
class Cell:
    """The runs of one (model, method, task): mean and sample std of the accuracy (%)."""

    runs: list[RunResult]

    @property
    def values(self) -> np.ndarray:
        return np.array([run.accuracy for run in self.runs], dtype=float)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> Optional[float]:
        return float(self.values.std(ddof=1)) if self.n > 1 else None

    @property
    def subset(self) -> bool:
        """True when a run was scored on fewer examples than the task's full evaluation split."""
        full = FULL_EVAL_SIZES.get(self.runs[0].task)
        return full is not None and any(r.num_eval_examples is not None and r.num_eval_examples < full
                                        for r in self.runs)


@dataclass
class ModelTable:
    """One model's table: ``cells[method][task]``, the methods in row order, and footnotes."""

    model: str
    methods: list[str]
    cells: dict[str, dict[str, Cell]]
    active_experts: dict[str, Optional[float]]
    shared_tasks: Optional[list[str]]  # set when some row lacks a task (the "Avg (shared)" column)
    notes: list[str]

    @property
    def published(self) -> dict[str, dict[str, float]]:
        return PUBLISHED.get(self.model, {})

    def ours_avg(self, method: str) -> Optional[float]:
        """Mean over all nine tasks, or None when the row lacks one."""
        row = self.cells.get(method, {})
        return float(np.mean([row[t].mean for t in TASKS])) if all(t in row for t in TASKS) else None

    def ours_shared_avg(self, method: str) -> Optional[float]:
        if not self.shared_tasks:
            return None
        return float(np.mean([self.cells[method][t].mean for t in self.shared_tasks]))

    def published_shared_avg(self, method: str) -> Optional[float]:
        pub = self.published.get(method)
        if pub is None or not self.shared_tasks:
            return None
        return float(np.mean([pub[t] for t in self.shared_tasks]))


def _task_metric(metrics: RunMetrics) -> Optional[tuple[str, float]]:
    """(title, value) of the run's task metric: the first of its spec's extra metrics that a table shows
    (any of them for a task not registered here), None when the run has none."""
    spec = REGISTERED_TASKS.get(metrics.task)
    names = spec.extra_metrics if spec is not None else tuple(METRIC_TITLES)
    for name in names:
        value = getattr(metrics, name, None)
        if name in METRIC_TITLES and value is not None:
            return METRIC_TITLES[name], value
    return None


def _read_run(path: Path) -> RunResult:
    """One run from its metrics.json (the trainer's ``RunMetrics``) and the config.yaml beside it."""
    metrics = RunMetrics.read(path)
    config_path = path.parent / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    return RunResult(
        path=path.parent, model=str(metrics.model), task=str(metrics.task), method=str(metrics.method),
        seed=int(metrics.seed), accuracy=100.0 * float(metrics.accuracy),  # metrics.json stores a fraction
        num_eval_examples=metrics.num_eval_examples,
        avg_active_experts=(metrics.routing or {}).get("avg_active_experts"),
        protocol=metrics.protocol, config=config if isinstance(config, dict) else {},
        task_metric=_task_metric(metrics),
        label_counts=metrics.label_counts, prediction_counts=metrics.prediction_counts, wall_time_s=metrics.wall_time_s,
    )


def collect_runs(root: Union[str, Path]) -> list[RunResult]:
    """Every ``metrics.json`` under ``root`` (sorted by path).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: a metrics file lacks a key, or two runs share model, task, method and seed
            (both paths named: point at one sweep root so no setting is counted twice).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass the folder that holds the runs (e.g. runs/)")
    runs = [_read_run(path) for path in sorted(root.rglob(METRICS_NAME))]
    seen: dict[tuple, Path] = {}
    for run in runs:
        key = (run.model, run.task, run.method, run.seed)
        if key in seen:
            raise ValueError(
                f"two runs of model={run.model} task={run.task} method={run.method} seed={run.seed}: "
                f"{seen[key]} and {run.path}; point make_tables at one sweep root (or move one away)"
            )
        seen[key] = run.path
    return runs


def _method_order(methods: Sequence[str]) -> list[str]:
    known = [m for m in METHOD_LABELS if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_LABELS)


def _differing_settings(runs: Sequence[RunResult]) -> list[str]:
    """Config keys (other than seed and output dir) whose values differ between ``runs``."""
    keys = set().union(*(run.config for run in runs)) - PER_RUN_KEYS
    def value(run: RunResult, key: str) -> str:
        return json.dumps(run.config.get(key), sort_keys=True, default=str)
    return sorted(k for k in keys if len({value(run, k) for run in runs}) > 1)


def build_tables(runs: Sequence[RunResult]) -> list[ModelTable]:
    """Groups runs into one table per model (models sorted by name)."""
    by_model: dict[str, list[RunResult]] = {}
    for run in runs:
        by_model.setdefault(run.model, []).append(run)
    tables = []
    for model in sorted(by_model):
        model_runs = by_model[model]
        notes: list[str] = []
        ignored = sorted({r.task for r in model_runs if r.task not in TASKS})
        if ignored:
            notes.append(f"Runs of {', '.join(ignored)} are not shown (not a column of the paper's table).")
        cells: dict[str, dict[str, Cell]] = {}
        for run in sorted(model_runs, key=lambda r: r.seed):
            if run.task in TASKS:
                cells.setdefault(run.method, {}).setdefault(run.task, Cell([])).runs.append(run)
        methods = _method_order(list(cells))
        for method in methods:
            for task, cell in cells[method].items():
                differing = _differing_settings(cell.runs)
                if differing:
                    notes.append(f"{METHOD_LABELS.get(method, method)} / {task}: the {cell.n} runs averaged differ in "
                                 f"{', '.join(differing)} (not only the seed).")
        active = {}
        for method in methods:
            values = [r.avg_active_experts for row in cells[method].values() for r in row.runs
                      if r.avg_active_experts is not None]
            active[method] = float(np.mean(values)) if values else None
        complete = all(all(t in cells[m] for t in TASKS) for m in methods)
        shared = None
        if not complete:
            shared = [t for t in TASKS if all(t in cells[m] for m in methods)]
        tables.append(ModelTable(model, methods, cells, active, shared, notes))
    return tables


def _number(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(cell: Optional[Cell], digits: int) -> str:
    if cell is None:
        return MISSING
    text = _number(cell.mean, digits)
    if cell.std is not None:
        text += f" ± {cell.std:.{digits}f} (n={cell.n})"
    return text + (SUBSET_MARK if cell.subset else "")


def _rows(table: ModelTable, digits: int) -> list[tuple[str, str, list[Optional[float]], list[str]]]:
    """(method, source, numeric values, display texts) for every row of a table, in order."""
    rows = []
    for method in table.methods:
        row = table.cells[method]
        ours = [row[t].mean if t in row else None for t in TASKS] + [table.ours_avg(method)]
        texts = [_cell_text(row.get(t), digits) for t in TASKS] + [_number(table.ours_avg(method), digits)]
        if table.shared_tasks is not None:
            ours.append(table.ours_shared_avg(method))
            texts.append(_number(table.ours_shared_avg(method), digits))
        ours.append(table.active_experts[method])
        texts.append(_number(table.active_experts[method], 2))
        rows.append((method, "ours", ours, texts))
        pub = table.published.get(method)
        if pub is None:
            continue
        published = [pub[t] for t in TASKS] + [pub["avg"]]
        if table.shared_tasks is not None:
            published.append(table.published_shared_avg(method))
        published.append(None)
        rows.append((method, "published", published, [_number(v, digits) for v in published[:-1]] + [""]))
        diff = [None if a is None or b is None else a - b for a, b in zip(ours[:-1], published[:-1])] + [None]
        rows.append((method, "ours − published", diff, [_number(v, digits, signed=True) for v in diff[:-1]] + [""]))
    return rows


def _headers(table: ModelTable) -> list[str]:
    headers = [title for _, title in TASK_COLUMNS] + ["Avg"]
    if table.shared_tasks is not None:
        headers.append("Avg (shared)")
    return headers + ["active experts"]


def _footnotes(table: ModelTable, runs_total: int) -> list[str]:
    notes = [f"Accuracy (%) on each task's evaluation split, {runs_total} runs; mean ± sample std (n = seeds) "
             "where a cell has several seeds, one run otherwise; — = no run (never filled in)."]
    notes.append("Avg = mean over all nine tasks, shown only for rows that have all nine.")
    if table.shared_tasks is not None:
        shared = ", ".join(title for task, title in TASK_COLUMNS if task in table.shared_tasks) or "none"
        notes.append(f"Avg (shared) = mean over the tasks every row of ours in this table has ({shared})"
                     + ("; the published rows are averaged over the same tasks." if table.published else "."))
    notes.append("active experts = mean over this row's runs of the average number of experts with nonzero "
                 "weight per token and adapted module (evaluation split); it depends on the tasks run.")
    if table.published:
        notes.append("published = docs/method.md §5 (one run each, best epoch picked on the reported split); "
                     "ours − published in accuracy points. The published LD-MoLE numbers are under LD-MoLE "
                     "(reference init), method ldmole_reference: the paper ran the authors' release, whose λ-MLP "
                     "initialisation that method reproduces; LD-MoLE (method ldmole, the live initialisation) has no "
                     "published row.")
    else:
        notes.append("No published numbers for this model in docs/method.md §5 (Llama-3.2-3B; LD-MoLE on Llama-3.1-8B).")
    if any(c.subset for row in table.cells.values() for c in row.values()):
        notes.append(f"{SUBSET_MARK} scored on fewer examples than the task's full evaluation split "
                     "(eval_max_examples): not comparable with the published numbers.")
    protocols = sorted({r.protocol for row in table.cells.values() for c in row.values() for r in c.runs if r.protocol})
    if protocols and protocols != ["reference"]:
        notes.append(f"Our runs use protocol={'/'.join(protocols)}: the best epoch is picked on a split carved "
                     "from train, not on the reported split as in the paper, so a small gap in the paper's favour "
                     "is expected.")
    return notes + table.notes


def format_markdown(tables: Sequence[ModelTable], digits: int = 1) -> str:
    """All tables as Markdown, one ``###`` section per model with its footnotes."""
    parts = []
    for table in tables:
        headers = _headers(table)
        lines = [f"### {table.model}", "", "| method | " + " | ".join(headers) + " |",
                 "|---|" + "---|" * len(headers)]
        for method, source, _, texts in _rows(table, digits):
            label = METHOD_LABELS.get(method, method)
            name = label if source == "ours" else f"{label} · {source}"
            lines.append(f"| {name} | " + " | ".join(texts) + " |")
        runs_total = sum(c.n for row in table.cells.values() for c in row.values())
        lines.append("")
        lines.extend(f"- {note}" for note in _footnotes(table, runs_total))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _csv_rows(table: ModelTable) -> tuple[list[str], list[list]]:
    """Numeric CSV of one table: the Markdown rows plus std and n columns per task."""
    headers = _headers(table)
    columns = ["model", "method", "source"] + headers + [f"{title} std" for _, title in TASK_COLUMNS] + \
        [f"{title} n" for _, title in TASK_COLUMNS]
    rows = []
    for method, source, values, _ in _rows(table, digits=6):
        row = table.cells[method]
        std = [row[t].std if source == "ours" and t in row else None for t in TASKS]
        n = [row[t].n if source == "ours" and t in row else None for t in TASKS]
        rows.append([table.model, method, source] + [("" if v is None else round(v, 4)) for v in values + std]
                    + ["" if v is None else v for v in n])
    return columns, rows


def write_tables(tables: Sequence[ModelTable], out_dir: Union[str, Path], digits: int = 1) -> list[Path]:
    """Writes ``results.md`` (all models) and ``<model>.csv`` per model to ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.md"]
    written[0].write_text(format_markdown(tables, digits))
    for table in tables:
        columns, rows = _csv_rows(table)
        path = out_dir / f"{table.model}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        written.append(path)
    return written


@dataclass
class TaskRow:
    """One method's runs of one task (accuracy in %, the task metric as stored, e.g. MCC in [-1, 1])."""

    method: str
    runs: list[RunResult]

    def _mean_std(self, values: list[float]) -> tuple[Optional[float], Optional[float]]:
        if not values:
            return None, None
        return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

    @property
    def accuracy(self) -> tuple[float, Optional[float]]:
        return self._mean_std([r.accuracy for r in self.runs])  # type: ignore[return-value]

    @property
    def seed_se(self) -> Optional[float]:
        """Standard error of the mean accuracy over seeds (sample std / sqrt(n)); None for one run."""
        _, std = self.accuracy
        return None if std is None else std / math.sqrt(len(self.runs))

    @property
    def task_metric(self) -> tuple[Optional[str], Optional[float], Optional[float]]:
        named = [r.task_metric for r in self.runs if r.task_metric is not None]
        if len(named) != len(self.runs):
            return None, None, None
        return (named[0][0], *self._mean_std([value for _, value in named]))

    @property
    def top_answer_share(self) -> Optional[float]:
        """Mean over runs of the share of the evaluation examples given the most frequent predicted answer."""
        shares = [max(r.prediction_counts.values()) / sum(r.prediction_counts.values())
                  for r in self.runs if r.prediction_counts]
        return float(np.mean(shares)) if len(shares) == len(self.runs) else None

    @property
    def active_experts(self) -> Optional[float]:
        values = [r.avg_active_experts for r in self.runs if r.avg_active_experts is not None]
        return float(np.mean(values)) if values else None

    @property
    def wall_time_s(self) -> Optional[float]:
        values = [r.wall_time_s for r in self.runs if r.wall_time_s is not None]
        return float(np.mean(values)) if values else None


@dataclass
class TaskTable:
    """One (model, task): its method rows, the size of the scored split and its majority-class rate."""

    model: str
    task: str
    rows: list[TaskRow]
    num_examples: Optional[int]
    majority_label: Optional[str]
    majority_rate: Optional[float]  # %, of the gold labels of the scored split
    notes: list[str]

    @property
    def binomial_se(self) -> Optional[float]:
        """Binomial standard error (%) of an accuracy at the majority rate on this split."""
        if self.majority_rate is None or not self.num_examples:
            return None
        p = self.majority_rate / 100
        return 100 * math.sqrt(p * (1 - p) / self.num_examples)

    def majority_metric(self, metric: str) -> Optional[float]:
        """The task metric of always answering the majority class: MCC 0; F1 (of class 1, as the
        evaluation computes it) 2p / (1 + p) when the majority class is 1 at rate p, else 0."""
        if metric == "MCC":
            return 0.0
        if metric == "F1" and self.majority_rate is not None:
            p = self.majority_rate / 100
            return 2 * p / (1 + p) if self.majority_label == "1" else 0.0
        return None

    def margin_in_se(self, row: TaskRow) -> Optional[float]:
        """(mean accuracy - majority rate) / binomial SE."""
        se = self.binomial_se
        return None if se is None or se == 0 else (row.accuracy[0] - self.majority_rate) / se


def task_tables(runs: Sequence[RunResult]) -> list[TaskTable]:
    """One table per (model, task), sorted; methods in row order.

    The majority class comes from the runs' ``label_counts`` (the gold labels of the scored examples);
    runs scored on different example counts or gold distributions are noted, and the first run's is used.
    """
    groups: dict[tuple[str, str], dict[str, list[RunResult]]] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        groups.setdefault((run.model, run.task), {}).setdefault(run.method, []).append(run)
    tables = []
    for (model, task), by_method in sorted(groups.items()):
        every = [r for rs in by_method.values() for r in rs]
        notes = []
        counted = [r for r in every if r.label_counts]
        label = rate = None
        if counted:
            counts = counted[0].label_counts
            label = max(counts, key=counts.get)
            rate = 100.0 * counts[label] / sum(counts.values())
            if any(r.label_counts != counts for r in counted):
                notes.append("the runs' gold labels differ (another split or eval_max_examples): "
                             "the majority rate is the first run's")
        sizes = sorted({r.num_eval_examples for r in every if r.num_eval_examples})
        if len(sizes) > 1:
            notes.append(f"runs were scored on different numbers of examples ({', '.join(map(str, sizes))})")
        rows = [TaskRow(method, by_method[method]) for method in _method_order(list(by_method))]
        tables.append(TaskTable(model, task, rows, sizes[0] if sizes else None, label, rate, notes))
    return tables


def _pm(mean: Optional[float], std: Optional[float], digits: int) -> str:
    if mean is None:
        return MISSING
    return _number(mean, digits) + ("" if std is None else f" ± {std:.{digits}f}")


def format_task_markdown(tables: Sequence[TaskTable], digits: int = 1) -> str:
    """Every per-task table as Markdown, one ``###`` section per (model, task) with its notes."""
    parts = []
    for table in tables:
        metric = next((r.task_metric[0] for r in table.rows if r.task_metric[0]), None)
        per_seed = any(len(row.runs) > 1 for row in table.rows)
        headers = ["method", "runs", "accuracy %", "SE over seeds", "accuracy per seed" if per_seed else None,
                   f"{metric}" if metric else None, "vs majority (SEs)", "top answer share", "active experts",
                   "wall time (s)"]
        headers = [h for h in headers if h is not None]
        lines = [f"### {table.model} · {table.task}", "", "| " + " | ".join(headers) + " |",
                 "|---|" + "---|" * (len(headers) - 1)]
        for row in table.rows:
            name, mean, std = row.task_metric
            cells = [METHOD_LABELS.get(row.method, row.method), str(len(row.runs)), _pm(*row.accuracy, digits),
                     _number(row.seed_se, digits)]
            if per_seed:
                cells.append(" · ".join(f"{r.seed}: {_number(r.accuracy, digits)}" for r in row.runs))
            if metric:
                cells.append(_pm(mean, std, 3) if name == metric else MISSING)
            margin = table.margin_in_se(row)
            cells += [_number(margin, 1, signed=True), _number(row.top_answer_share, 2),
                      _number(row.active_experts, 2), _number(row.wall_time_s, 0)]
            lines.append("| " + " | ".join(cells) + " |")
        if table.majority_rate is not None:
            cells = [f"majority class ({table.majority_label})", "", _number(table.majority_rate, digits), "",
                     *([""] if per_seed else []),
                     *([_number(table.majority_metric(metric), 3)] if metric else []), _number(0.0, 1, signed=True),
                     "1.00", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        n = f"{table.num_examples} " if table.num_examples else ""
        se = _number(table.binomial_se, 2)
        seeds = "; accuracy per seed = seed: accuracy, run by run" if per_seed else ""
        lines.append(f"- Accuracy on the {n}scored examples: mean ± sample std over the runs (seeds). "
                     f"SE over seeds = std / sqrt(runs){seeds}. Binomial SE of one run at the majority rate: {se} "
                     "points; vs majority = (mean accuracy - majority rate) / that SE.")
        lines.append("- top answer share = share of the examples given the most frequent predicted answer "
                     "(1.00: the same answer for every example). Wall time: mean seconds per run.")
        lines.extend(f"- Note: {note}." for note in table.notes)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
