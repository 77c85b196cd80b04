"""ldmole/report/tables.py and ldmole-tables on synthetic metrics.json files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ldmole.report.tables import (FULL_EVAL_SIZES, METHOD_LABELS, PUBLISHED, TASK_COLUMNS, build_tables, collect_runs,
                           format_markdown, write_tables)
from tests.helpers import REPO_ROOT

TASKS = [task for task, _ in TASK_COLUMNS]


def write_run(root: Path, model: str, task: str, method: str, seed: int, accuracy: float,
              active: float | None = 3.0, num_eval: int | None = None, **config) -> Path:
    """A run folder as the trainer writes it (metrics.json + config.yaml), at the sweep's path."""
    run = root / model / task / method / f"seed{seed}"
    run.mkdir(parents=True)
    metrics = {"accuracy": accuracy, "num_eval_examples": num_eval or FULL_EVAL_SIZES.get(task, 100),
               "model": model, "task": task, "method": method, "seed": seed, "protocol": "selection",
               "routing": {} if active is None else {"avg_active_experts": active}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model, "task": task, "method": method, "seed": seed,
                                                     "output_dir": str(run), "lr": 1e-4, **config}))
    return run


def table_rows(markdown: str, model: str) -> dict[str, list[str]]:
    """{row label: cells} of one model's Markdown table."""
    section = markdown.split(f"### {model}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_every_method_config_has_a_row_label():
    methods = {p.stem for p in (REPO_ROOT / "configs" / "methods").glob("*.yaml")}
    assert methods - set(METHOD_LABELS) == set()


def test_published_table_matches_paper_averages():
    for model, methods in PUBLISHED.items():
        for method, row in methods.items():
            assert set(row) == set(TASKS) | {"avg"}, f"{model}/{method}: published row must name all nine tasks"
            assert np.mean([row[t] for t in TASKS]) == pytest.approx(row["avg"], abs=0.03), \
                f"{model}/{method}: the typed-in cells should average to the paper's Avg {row['avg']} " \
                "(up to the rounding of its cells)"


def test_cell_is_mean_and_sample_std_over_seeds_with_n(tmp_path):
    for seed, acc in zip((1, 2, 3), (0.70, 0.74, 0.78)):
        write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole_reference", seed, acc)
    markdown = format_markdown(build_tables(collect_runs(tmp_path)))
    rows = table_rows(markdown, "llama3.2_3b")
    assert rows["LD-MoLE (reference init)"]["ARC-C"] == "74.0 ± 4.0 (n=3)", \
        "expected mean 74.0 and sample std 4.0 over 3 seeds"
    assert rows["LD-MoLE (reference init) · published"]["ARC-C"] == "74.6"
    assert rows["LD-MoLE (reference init) · ours − published"]["ARC-C"] == "-0.6"


def test_published_ldmole_sits_under_the_method_that_replicates_the_papers_runs(tmp_path):
    write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole", 42, 0.70)
    write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole_reference", 42, 0.72)
    markdown = format_markdown(build_tables(collect_runs(tmp_path)))
    rows = table_rows(markdown, "llama3.2_3b")
    assert "LD-MoLE (reference init) · published" in rows
    assert "LD-MoLE · published" not in rows, \
        "the paper ran the authors' release (ldmole_reference's initialisation), not ldmole's live λ-MLP"
    assert "The published LD-MoLE numbers are under LD-MoLE (reference init)" in markdown


def test_missing_cells_stay_missing_and_avg_needs_all_nine(tmp_path):
    write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole_reference", 42, 0.80)
    write_run(tmp_path, "llama3.2_3b", "rte", "ldmole_reference", 42, 0.90)
    write_run(tmp_path, "llama3.2_3b", "arc_c", "mola_8888", 42, 0.70)
    markdown = format_markdown(build_tables(collect_runs(tmp_path)))
    rows = table_rows(markdown, "llama3.2_3b")
    ours = "LD-MoLE (reference init)"
    assert rows[ours]["SWAG"] == "—" and rows["MoLA 8888"]["RTE"] == "—", "tasks without runs must show —"
    assert rows[ours]["Avg"] == "—", "Avg is only shown for rows with all nine tasks"
    # shared tasks = the ones every row has (ARC-C only), published averaged over the same task
    assert rows[ours]["Avg (shared)"] == "80.0" and rows["MoLA 8888"]["Avg (shared)"] == "70.0"
    assert rows[f"{ours} · published"]["Avg (shared)"] == "74.6"
    assert rows[f"{ours} · published"]["Avg"] == "82.0", "the published row keeps the paper's own Avg"
    assert "Avg (shared) = mean over the tasks every row of ours in this table has (ARC-C)" in markdown


def test_complete_rows_get_avg_without_shared_column(tmp_path):
    for i, task in enumerate(TASKS):
        write_run(tmp_path, "qwen3_1.7b", task, "ldmole", 42, 0.5 + 0.01 * i)
    table = build_tables(collect_runs(tmp_path))[0]
    assert table.shared_tasks is None
    assert table.ours_avg("ldmole") == pytest.approx(54.0)
    rows = table_rows(format_markdown([table]), "qwen3_1.7b")
    assert rows["LD-MoLE"]["Avg"] == "54.0" and "Avg (shared)" not in rows["LD-MoLE"]
    assert not any(label.endswith("· published") for label in rows), \
        "docs/method.md holds no published Qwen3-1.7B numbers"


def test_active_experts_column_averages_the_rows_runs(tmp_path):
    write_run(tmp_path, "llama3.2_3b", "arc_c", "remole", 1, 0.7, active=2.0)
    write_run(tmp_path, "llama3.2_3b", "arc_c", "remole", 2, 0.7, active=3.0)
    write_run(tmp_path, "llama3.2_3b", "rte", "remole", 1, 0.7, active=4.0)
    write_run(tmp_path, "llama3.2_3b", "arc_c", "lora", 1, 0.7, active=None)
    rows = table_rows(format_markdown(build_tables(collect_runs(tmp_path))), "llama3.2_3b")
    assert rows["ReMoLE"]["active experts"] == "3.00"
    assert rows["LoRA"]["active experts"] == "—", "a router-less method has no active-expert count"


def test_subset_evaluations_and_differing_settings_are_flagged(tmp_path):
    write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole", 1, 0.7, num_eval=64)
    write_run(tmp_path, "llama3.2_3b", "arc_c", "ldmole", 2, 0.7, num_eval=64, lr=3e-4)
    markdown = format_markdown(build_tables(collect_runs(tmp_path)))
    assert table_rows(markdown, "llama3.2_3b")["LD-MoLE"]["ARC-C"].endswith("†")
    assert "the 2 runs averaged differ in lr" in markdown


def test_duplicate_runs_are_an_error_naming_both(tmp_path):
    first = write_run(tmp_path / "a", "llama3.2_3b", "arc_c", "ldmole", 42, 0.7)
    second = write_run(tmp_path / "b", "llama3.2_3b", "arc_c", "ldmole", 42, 0.8)
    with pytest.raises(ValueError, match="two runs") as error:
        collect_runs(tmp_path)
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_write_tables_writes_markdown_and_one_csv_per_model(tmp_path):
    for seed, acc in ((1, 0.6), (2, 0.8)):
        write_run(tmp_path / "runs", "llama3.2_3b", "arc_c", "ldmole_reference", seed, acc)
    write_run(tmp_path / "runs", "qwen3_1.7b", "rte", "mola_2468", 42, 0.9)
    paths = write_tables(build_tables(collect_runs(tmp_path / "runs")), tmp_path / "out")
    assert [p.name for p in paths] == ["results.md", "llama3.2_3b.csv", "qwen3_1.7b.csv"]
    assert "### llama3.2_3b" in paths[0].read_text() and "### qwen3_1.7b" in paths[0].read_text()
    with open(paths[1]) as handle:
        rows = list(csv.DictReader(handle))
    by_source = {row["source"]: row for row in rows}
    assert set(by_source) == {"ours", "published", "ours − published"}
    assert float(by_source["ours"]["ARC-C"]) == pytest.approx(70.0)
    assert float(by_source["ours"]["ARC-C std"]) == pytest.approx(np.std([60, 80], ddof=1), abs=1e-3)
    assert by_source["ours"]["ARC-C n"] == "2" and by_source["ours"]["SWAG"] == ""
    assert float(by_source["ours − published"]["ARC-C"]) == pytest.approx(70.0 - 74.58)


def test_make_tables_script_prints_markdown_and_writes_files(tmp_path, capsys):
    write_run(tmp_path, "llama3.1_8b", "arc_c", "ldmole_reference", 42, 0.85)
    from ldmole.cli import make_tables as module

    assert module.main([str(tmp_path), "--digits", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| LD-MoLE (reference init) | — | 85.00 |" in printed
    assert "| LD-MoLE (reference init) · ours − published | — | +1.30 |" in printed
    assert (tmp_path / "tables" / "results.md").is_file() and (tmp_path / "tables" / "llama3.1_8b.csv").is_file()
    assert module.main([str(tmp_path / "empty_dir_that_is_missing")]) == 2


def write_glue_run(root: Path, method: str, seed: int, accuracy: float, mcc: float, predictions: dict,
                   labels=None, wall=100.0, task="cola") -> Path:
    run = write_run(root, "smollm2_135m", task, method, seed, accuracy, num_eval=1043)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update({"mcc": mcc, "prediction_counts": predictions, "wall_time_s": wall,
                    "label_counts": labels or {"0": 322, "1": 721}})
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_task_table_has_majority_rate_standard_errors_and_task_metric(tmp_path):
    from ldmole.report.tables import format_task_markdown, task_tables

    for seed, acc, mcc in [(42, 0.775, 0.43), (43, 0.765, 0.40), (44, 0.785, 0.45)]:
        write_glue_run(tmp_path, "lora", seed, acc, mcc, {"0": 200, "1": 843}, wall=700 + seed)
    write_glue_run(tmp_path, "ldmole", 42, 0.691, 0.0, {"1": 1043})
    [table] = task_tables(collect_runs(tmp_path))
    assert (table.model, table.task, table.num_examples, table.majority_label) == ("smollm2_135m", "cola", 1043, "1")
    assert table.majority_rate == pytest.approx(100 * 721 / 1043)
    p = 721 / 1043
    assert table.binomial_se == pytest.approx(100 * np.sqrt(p * (1 - p) / 1043))
    lora, ldmole = {row.method: row for row in table.rows}["lora"], {row.method: row for row in table.rows}["ldmole"]
    assert lora.accuracy[0] == pytest.approx(77.5) and lora.accuracy[1] == pytest.approx(1.0)
    assert lora.seed_se == pytest.approx(1.0 / np.sqrt(3)) and ldmole.seed_se is None
    assert table.margin_in_se(lora) == pytest.approx((77.5 - 100 * p) / table.binomial_se)
    assert lora.task_metric[:2] == ("MCC", pytest.approx(0.4267, abs=1e-4))
    assert ldmole.top_answer_share == 1.0 and lora.top_answer_share == pytest.approx(843 / 1043)
    assert lora.wall_time_s == pytest.approx(743)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in format_task_markdown([table]).splitlines() if line.startswith("| ")}
    assert rows["LoRA"][1:6] == ["3", "77.5 ± 1.0", "0.6", "42: 77.5 · 43: 76.5 · 44: 78.5", "0.427 ± 0.025"]
    assert rows["LoRA"][6] == f"{(77.5 - 100 * p) / table.binomial_se:+.1f}"
    assert rows["LD-MoLE"][1:3] == ["1", "69.1"] and rows["LD-MoLE"][4] == "42: 69.1" and rows["LD-MoLE"][7] == "1.00"
    assert rows["majority class (1)"][2] == "69.1" and len(rows["majority class (1)"]) == len(rows["LoRA"])


def test_task_tables_cover_tasks_outside_the_paper_columns_and_note_mismatched_labels(tmp_path):
    from ldmole.report.tables import task_tables

    write_glue_run(tmp_path, "lora", 42, 0.80, 0.5, {"0": 1, "1": 1042}, task="mrpc")
    write_glue_run(tmp_path, "lora", 43, 0.80, 0.5, {"0": 1, "1": 1042}, labels={"0": 100, "1": 300}, task="mrpc")
    [table] = task_tables(collect_runs(tmp_path))
    assert table.task == "mrpc" and any("gold labels differ" in note for note in table.notes)


def test_majority_row_gives_the_task_metric_of_always_answering_the_majority_class(tmp_path):
    from sklearn.metrics import f1_score, matthews_corrcoef

    from ldmole.report.tables import format_task_markdown, task_tables

    for task, labels in [("mrpc", {"0": 129, "1": 279}), ("qqp", {"0": 300, "1": 108})]:
        run = write_glue_run(tmp_path, "lora", 42, 0.75, 0.0, {"0": 132, "1": 276}, labels=labels, task=task)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["f1"] = metrics.pop("mcc")
        (run / "metrics.json").write_text(json.dumps(metrics))
    for table in task_tables(collect_runs(tmp_path)):
        counts = {"mrpc": (129, 279), "qqp": (300, 108)}[table.task]
        gold = [0] * counts[0] + [1] * counts[1]
        always = [int(table.majority_label)] * len(gold)
        assert table.majority_metric("F1") == pytest.approx(f1_score(gold, always, zero_division=0))
        assert table.majority_metric("MCC") == matthews_corrcoef(gold, always) == 0.0
        row = next(line for line in format_task_markdown([table]).splitlines() if line.startswith("| majority"))
        assert row.split("|")[5].strip() == f"{f1_score(gold, always, zero_division=0):.3f}"


def test_make_tables_writes_the_per_task_tables(tmp_path, capsys):
    write_glue_run(tmp_path, "lora", 42, 0.775, 0.43, {"0": 200, "1": 843})
    from ldmole.cli import make_tables as module

    assert module.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "### smollm2_135m · cola" in printed and "majority class (1)" in printed
    assert "majority class (1)" in (tmp_path / "tables" / "tasks.md").read_text()
