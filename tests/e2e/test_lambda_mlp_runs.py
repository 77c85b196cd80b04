"""The λ-MLP in short training runs: the per-token λ spread of the live init, and the probe script
on the dead reference init and the live default."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_command, tiny_run


@pytest.mark.slow
@pytest.mark.parametrize("method, spread_above", [("ldmole", True), ("ldmole_reference", False)])
def test_short_training_run_gives_per_token_lambda_spread_only_with_the_live_init(method, spread_above, tmp_path):
    args = tiny_run(f"method={method}", f"output_dir={tmp_path}", "max_steps=8",
                                          "eval_max_examples=32", "train_max_examples=64", "save_epoch_adapters=[]", task="arc_e")
    result = run_command("ldmole.cli.train", args)
    assert result.returncode == 0, result.stderr[-3000:]
    quantiles = json.loads((tmp_path / "metrics.json").read_text())["routing"]["lambda"]["quantiles"]
    spread = quantiles["q95"] - quantiles["q05"]
    if spread_above:
        assert spread > 0.1, f"{method}: λ q95 - q05 = {spread}; the live λ-MLP should vary per token"
    else:
        assert spread <= 0.02, f"{method}: λ q95 - q05 = {spread}; the reference init should give a constant λ"


@pytest.mark.slow
def test_probe_script_reports_dead_reference_units_and_live_default_units(tmp_path):
    fractions = {}
    for method in ("ldmole", "ldmole_reference"):
        out = tmp_path / f"{method}.json"
        result = run_command("ldmole.cli.probe_lambda", tiny_run(
            f"method={method}", "--num-examples", "4", "--json", str(out), task="arc_e"))
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads(out.read_text())
        assert len(rows) == 4 * 7 and "λ q05 / q50 / q95" in result.stdout
        fractions[method] = [row["active_fraction"] for row in rows]
    assert min(fractions["ldmole"]) > 0.25, fractions["ldmole"]
    assert max(fractions["ldmole_reference"]) < 0.01, fractions["ldmole_reference"]
