"""ldmole-routing-report: tables read from routing_summary.json files of synthetic routing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldmole.cli import routing_report as cli
from ldmole.report import routing_plots as rp
from ldmole.report.routing_report import find_summaries, overview_markdown, per_layer_markdown
from tests.test_routing_plots import synthetic_routing


def write_summary(folder, routing, accuracy, frequencies=None):
    folder.mkdir(parents=True)
    data = {"accuracy": {"final": accuracy}, **rp.routing_summary(routing, frequencies)}
    (folder / "routing_summary.json").write_text(json.dumps(data))
    return data


def cells(markdown: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of every row of a Markdown table but its header."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")][1:] for line in rows}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "sparsity_coef_10" / "smollm2_135m" / "cola" / "ldmole_sparse_k2" / "seed42"
    frequencies = np.arange(16) * 7
    init = write_summary(run / "plots_init", synthetic_routing(seed=1), 0.5, frequencies)
    trained = write_summary(run / "plots", synthetic_routing(seed=2), 0.75, frequencies)
    return run, init, trained


def test_a_run_folder_gives_its_summaries_before_and_after_training(run_dir):
    run, init, trained = run_dir
    before, after = find_summaries([run])
    assert before.label == "ldmole_sparse_k2 seed42 (sparsity_coef=10), before training"
    assert after.label.endswith("trained") and after.accuracy == 75.0
    rows = cells(overview_markdown([before, after]))
    lam = trained["lambda"]
    assert rows[after.label][1:4] == ["75.0", f"{trained['active_experts']['mean']:.2f}",
                                      f"{trained['active_experts']['min']:.0f}"]
    assert rows[after.label][5] == f"{lam['q05']:.2f} / {lam['q50']:.2f} / {lam['q95']:.2f}"
    assert rows[before.label][4] == f"{100 * init['zero_activation_rate']['overall']:.2f}%"


def test_per_layer_table_reads_each_layers_lambda_range_and_active_count(run_dir):
    run, init, trained = run_dir
    table = per_layer_markdown(find_summaries([run]), layers=[1, 2])
    rows = cells(table)
    assert set(rows) == {"1", "2"}
    q = trained["lambda"]["per_layer"]["2"]
    assert rows["2"][1] == f"{q['q05']:.2f} … {q['q95']:.2f}"
    assert rows["2"][3] == f"{trained['active_experts']['per_layer']['2']['mean']:.2f}"


def test_cli_prints_all_three_tables_and_names_a_missing_summary(run_dir, tmp_path, capsys):
    run, _, trained = run_dir
    assert cli.main([str(run), "--out", str(tmp_path / "report.md")]) == 0
    text = capsys.readouterr().out
    assert "#### Per layer" in text and "#### Active experts by token frequency" in text
    first = trained["active_by_token_frequency"][0]
    assert f"{first['mean']:.2f} ± {first['se']:.3f} (n={first['tokens']})" in text
    assert text == (tmp_path / "report.md").read_text() + "\n"
    assert cli.main([str(tmp_path / "nothing_here")]) == 2
    assert "ldmole-plot-routing" in capsys.readouterr().err
    assert cli.main([str(run), "--layers", "a,b"]) == 2
