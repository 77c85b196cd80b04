"""ldmole-routing-report: tables read from routing_summary.json files of synthetic routing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldmole.cli import routing_report as cli
from ldmole.report import routing_plots as rp
from ldmole.report.routing_report import find_summaries, lambda_bands, overview_markdown, per_layer_markdown
from tests.unit.test_routing_plots import synthetic_routing


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


def metrics_run(tmp_path, routing, name="ldmole", accuracy=0.7):
    """A run folder holding only a metrics.json whose routing block the trainer's summary() wrote."""
    run = tmp_path / "smollm2_135m" / "cola" / name / "seed43"
    run.mkdir(parents=True)
    metrics = {"accuracy": accuracy, "num_eval_examples": 4, "routing": routing.summary() if routing else None}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_a_run_without_plots_reads_the_routing_of_its_metrics(tmp_path):
    routing = synthetic_routing(seed=3)
    [summary] = find_summaries([metrics_run(tmp_path, routing)])
    direct = rp.routing_summary(routing)
    assert summary.label == "ldmole seed43, trained" and summary.accuracy == pytest.approx(70.0)
    assert summary.data["active_experts"]["mean"] == pytest.approx(direct["active_experts"]["mean"])
    for layer, entry in direct["active_experts"]["per_layer"].items():
        assert summary.data["active_experts"]["per_layer"][layer]["mean"] == pytest.approx(entry["mean"])
    assert summary.data["zero_activation_rate"]["overall"] == pytest.approx(direct["zero_activation_rate"]["overall"])
    # The trainer's λ quantiles are inverted-CDF quantiles of 0.01-wide histogram bins (bin centres).
    lam = summary.data["lambda"]
    pooled = {layer: np.concatenate([routing.lam(key) for key in routing.modules if key[0] == layer])
              for layer in routing.layers}
    for q in ("q05", "q50", "q95"):
        level = int(q[1:]) / 100
        assert lam[q] == pytest.approx(np.quantile(np.concatenate(list(pooled.values())), level,
                                                   method="inverted_cdf"), abs=0.006)
        for layer, values in pooled.items():
            assert lam["per_layer"][str(layer)][q] == pytest.approx(np.quantile(values, level, method="inverted_cdf"),
                                                                    abs=0.006)
    assert lam["spread"] == pytest.approx(lam["q95"] - lam["q05"]) and lam["q05"] < lam["q50"] < lam["q95"]
    row = cells(overview_markdown([summary]))["ldmole seed43, trained"]
    assert row[0] == "4" and row[3] == "—", "metrics.json has no fewest-active count"


def test_plots_take_precedence_over_metrics_and_lora_metrics_name_the_fix(run_dir, tmp_path):
    run, _, _ = run_dir
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.1, "routing": synthetic_routing(seed=5).summary()}))
    assert [s.accuracy for s in find_summaries([run])] == [50.0, 75.0]
    with pytest.raises(FileNotFoundError, match="no routing in a metrics.json"):
        find_summaries([metrics_run(tmp_path, None, name="lora")])


def test_cli_draws_lambda_per_layer_of_every_run_that_has_one(tmp_path, capsys):
    sparsegen = metrics_run(tmp_path, synthetic_routing(seed=3))
    relu = metrics_run(tmp_path, synthetic_routing(seed=4, router="relu"), name="remole")
    figure = tmp_path / "lambda.png"
    assert cli.main([str(sparsegen), str(relu), "--lambda-figure", str(figure)]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"
    bands = lambda_bands(find_summaries([sparsegen, relu]))
    assert list(bands) == ["ldmole seed43, trained"] and sorted(bands["ldmole seed43, trained"]) == [0, 1, 2]
    capsys.readouterr()
    assert cli.main([str(relu), "--lambda-figure", str(tmp_path / "none.png")]) == 2
    assert "no run with a λ per layer" in capsys.readouterr().err and not (tmp_path / "none.png").exists()
