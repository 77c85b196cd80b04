"""ldmole-bench-layer (the command, ``ldmole.cli.bench_layer``, and its measuring library,
``ldmole.experiment.bench``) at tiny shapes: complete JSON output, goal ratios, and a timed dense-einsum
variant that computes what the ldmole variant computes (correctness itself: tests/test_dense_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--shapes", "32x48", "--tokens", "16", "--experts", "4", "--rank", "2", "--iters", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def cli():
    from ldmole.cli import bench_layer as module

    return module


@pytest.fixture(scope="module")
def bench():
    from ldmole.experiment import bench as module

    return module


def expected_variants(bench) -> set[str]:
    names = {bench.BASE_VARIANT, bench.PEFT_VARIANT, bench.LDMOLE_LORA_VARIANT}
    for router in bench.ROUTERS:
        if router != "lora":
            names |= {bench.ldmole_name(router), bench.dense_name(router)}
    return names


def test_main_writes_every_variant(cli, bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(TINY + ["--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ldmole sparsegen |" in printed and "torch.get_num_threads()" in printed

    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["environment"]["dtype"] == "float32"
    assert result["environment"]["torch_num_threads"] == 1
    [shape] = result["shapes"]
    assert (shape["d_in"], shape["d_out"]) == (32, 48)
    rows = {row["variant"]: row for row in shape["rows"]}
    assert set(rows) == expected_variants(bench) and len(rows) == 13
    for name, row in rows.items():
        assert row["median_ms"] > 0 and row["min_ms"] > 0, name
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"]), name
        assert row["peak_mb"] > 0, name
        assert row["saved_mb"] >= 0, name
        assert row["ratio_vs_peft"] > 0, name
        if row["family"] == "ldmole" and row["router"] != "lora":
            assert row["speedup_vs_dense"] > 0 and row["saved_mb"] > 0, name
    # the dense formulation keeps a [T, E, d_out] tensor for backward, ldmole does not
    assert rows["dense-einsum softmax"]["saved_mb"] > rows["ldmole softmax"]["saved_mb"]
    assert result["goals"] == {}  # 2048x6144 not run


@pytest.mark.parametrize("router", ["sparsegen", "sparsegen_fixed", "topk", "relu", "softmax"])
def test_timed_dense_variant_computes_the_ldmole_variants_output(cli, bench, router):
    settings = cli.settings_of(cli.build_parser().parse_args(TINY))
    torch.manual_seed(0)
    base = bench.make_base(32, 48, torch.device("cpu"), torch.float32)
    ldmole_variant, dense = bench.build_ldmole(base, router, settings), bench.build_dense(base, router, settings)
    assert type(dense.module).__name__ == "DenseEinsumMoLE" and dense.module.__module__ == "ldmole.core.dense_reference"
    dense.module.load_state_dict(ldmole_variant.module.state_dict())
    if router == "sparsegen":
        dense.module.lambda_mlp.load_state_dict(ldmole_variant.module.lambda_mlp.state_dict())
    x = torch.randn(1, 16, 32)
    ldmole_variant.module.eval(), dense.module.eval()
    torch.testing.assert_close(dense.module(x), ldmole_variant.module(x), atol=1e-5, rtol=1e-4)


def test_goal_ratios_are_computed_on_2048x6144(bench):
    args = bench.BenchSettings()
    rows = [dict(variant=name, median_ms=ms, adapter_ms=ms - 100.0) for name, ms in [
        (bench.BASE_VARIANT, 100.0), (bench.PEFT_VARIANT, 110.0), ("ldmole sparsegen", 130.0),
        ("dense-einsum sparsegen", 400.0), ("ldmole softmax", 120.0), ("dense-einsum softmax", 300.0)]]
    goals = bench.compute_goals([dict(d_in=2048, d_out=6144, rows=rows)], args)
    assert goals["values"]["sparsegen"]["speedup_vs_dense"] == pytest.approx(400 / 130)
    assert goals["values"]["sparsegen"]["speedup_met"] and goals["values"]["sparsegen"]["ratio_met"]
    assert not goals["values"]["softmax"]["speedup_met"]  # 2.5x < 3x
    assert any("goal >= 3x" in line and "rank-64" not in line for line in goals["lines"])
    assert any("PEFT LoRA rank-64 time (goal <= 1.5x)" in line for line in goals["lines"])


def test_threads_flag_does_not_leak(cli, bench, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "_run_benchmark", lambda settings, log: seen.append(torch.get_num_threads()) or {})
    bench.run_benchmark(cli.settings_of(cli.build_parser().parse_args(["--threads", "2"])))
    assert seen == [2] and torch.get_num_threads() == 1


def test_cli_defaults_are_the_librarys_and_bad_settings_exit_with_the_option_named(cli, bench):
    assert cli.settings_of(cli.build_parser().parse_args([])) == bench.BenchSettings()
    with pytest.raises(SystemExit, match="error: --top-k 5 exceeds --experts 4"):
        cli.main(TINY + ["--top-k", "5"])
    with pytest.raises(SystemExit, match="error: MoLEConfig.top_k=5 exceeds"):
        cli.main(TINY + ["--top-k", "5", "--routers", "relu"])
