"""ldmole-plot-routing on tiny saved runs: every figure, named layers and modules, ``--at-init``."""

from __future__ import annotations

import json

import pytest

from tests.helpers import scaled, tiny_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000, f"{path} should be a non-empty PNG"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


EVAL_EXAMPLES = scaled(16, 8)  # the fixture has 8 evaluation rows


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 3-step LD-MoLE run of the tiny Qwen3 on ARC-C (adapter/, adapter_epoch1/, metrics.json)."""
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.trainer import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(compose_config(tiny_run("method=ldmole", f"output_dir={out}", "max_steps=3",
                          "train_max_examples=48", f"selection_size={scaled(16, 2)}",
                          f"eval_max_examples={EVAL_EXAMPLES}")))
    return out


@pytest.fixture(scope="module")
def plot_routing():
    from ldmole.cli import plot_routing as module

    return module


@pytest.mark.slow
def test_plot_routing_on_a_saved_run_writes_every_figure(trained_run, plot_routing, tmp_path, capsys):
    status = plot_routing.main([str(trained_run), "--out", str(tmp_path), "--num-examples", str(EVAL_EXAMPLES), "--freq-examples", "40",
                                "--layer", "3", "--module", "down_proj", "--example", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 0, err
    for name in ("active_experts_per_layer.png", "lambda_per_layer.png", "active_vs_token_frequency.png",
                 "expert_share.png", "token_routing_L3_down_proj_ex2.png"):
        assert_png(tmp_path / name)
    assert not (tmp_path / "zero_activation_rate.png").exists()
    assert "skip zero_activation_rate.png: router 'sparsegen'" in err
    assert "warning" not in err, f"the rerun should reproduce the run's accuracy on the same examples: {err}"
    counts = json.loads((trained_run / "metrics.json").read_text())["prediction_counts"]
    assert sum(counts.values()) == EVAL_EXAMPLES
    assert "final (adapter/): accuracy" in err and f"predicted answers (class / option index: count) {counts}" in err


@pytest.mark.slow
def test_plot_routing_names_valid_layers_and_modules(trained_run, plot_routing, tmp_path, capsys):
    status = plot_routing.main([str(trained_run), "--out", str(tmp_path), "--num-examples", "4", "--freq-examples", "8",
                                "--layer", "9", "--device", "cpu"])
    assert status == 2 and "layers 0..3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """A tiny LD-MoLE run whose one step cannot move its weights (lr 1e-30): its saved adapter is
    the initial one."""
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.trainer import train

    out = tmp_path_factory.mktemp("frozen_run")
    train(compose_config(tiny_run("method=ldmole", f"output_dir={out}", "max_steps=1", "lr=1e-30",
                                            "weight_decay=0", "train_max_examples=48", f"selection_size={scaled(16, 2)}",
                                            f"eval_max_examples={EVAL_EXAMPLES}")))
    return out


@pytest.mark.slow
def test_at_init_reruns_the_adapter_as_training_started_it(frozen_run, trained_run, plot_routing, tmp_path, capsys):
    common = ["--num-examples", "6", "--freq-examples", "8", "--device", "cpu"]
    assert plot_routing.main([str(frozen_run), "--out", str(tmp_path / "saved"), *common]) == 0
    assert plot_routing.main([str(frozen_run), "--at-init", "--out", str(tmp_path / "init"), *common]) == 0
    assert plot_routing.main([str(trained_run), "--at-init", "--out", str(tmp_path / "trained_init"), *common]) == 0
    assert plot_routing.main([str(trained_run), "--out", str(tmp_path / "trained"), *common]) == 0
    capsys.readouterr()
    read = lambda name: json.loads((tmp_path / name / "routing_summary.json").read_text())  # noqa: E731

    def lambdas(summary):  # every per-layer λ statistic, flattened in layer order
        return [value for layer in summary["lambda"]["per_layer"].values() for value in layer.values()]
    saved, init = read("saved"), read("init")
    assert init["adapter"] == "at initialisation" and saved["adapter"] == "final"
    assert lambdas(init) == pytest.approx(lambdas(saved), abs=1e-6), \
        "--at-init must rebuild exactly the adapter training started from"
    assert init["active_experts"]["per_layer"] == saved["active_experts"]["per_layer"]
    trained, trained_init = read("trained"), read("trained_init")
    assert lambdas(trained_init) == pytest.approx(lambdas(init), abs=1e-6), \
        "both runs share the seed and config, so they start from the same adapter"
    assert lambdas(trained) != pytest.approx(lambdas(trained_init), abs=1e-6), \
        "three training steps move λ, so the initial and final summaries must differ"
    assert_png(tmp_path / "init" / "lambda_per_layer.png")
