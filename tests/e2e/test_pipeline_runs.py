"""ldmole-train end to end: the README's smoke commands (metrics and routing equal to a rescoring of the
saved adapter), an unknown key's exit code, ReMoLE's per-layer controller stepping once per optimiser step."""

from __future__ import annotations

import json
import math

import pytest

from ldmole.experiment.run_config import compose_config
from tests.helpers import rescore, run_command, scaled, tiny_run


@pytest.mark.slow
def test_train_script_rejects_unknown_key_with_exit_code_2():
    result = run_command("ldmole.cli.train", ["methd=ldmole"], timeout=60)
    assert result.returncode == 2 and "did you mean 'method'" in result.stderr


SMOKE_RUNS = {"tiny_qwen3-arc_c": ("tiny_qwen3", "arc_c"), "tiny_llama-rte": ("tiny_llama", "rte")}


# docs/data.md's tiny-model command on the shared data; on the 8-row fixture (7 training rows) one epoch holds at
# most 7 steps, so it runs 6 steps of batch 1 and evaluates the 8 rows there are.
SMOKE_STEPS, SMOKE_LOG_EVERY, SMOKE_EVAL = scaled(20, 6), scaled(10, 3), scaled(64, 8)
SMOKE_BATCH = scaled([], ["batch_size=1", "per_device_batch_size=1", f"log_every={SMOKE_LOG_EVERY}"])


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(SMOKE_RUNS))
def test_readme_smoke_command_writes_metrics_and_adapter(run, tmp_path):
    model, task = SMOKE_RUNS[run]
    args = tiny_run("method=ldmole", f"max_steps={SMOKE_STEPS}", "eval_max_examples=64", *SMOKE_BATCH,
                    model=model, task=task, output_dir=tmp_path)
    result = run_command("ldmole.cli.train", args)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_eval_examples"] == SMOKE_EVAL and metrics["steps"] == SMOKE_STEPS
    assert metrics["best_epoch"] == 1 and len(metrics["history"]) == 1
    # The saved adapter scored here, apart from the trainer: the same accuracy and routing summary.
    accuracy, rescored = rescore(tmp_path / "adapter", compose_config(args))
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    routing = metrics["routing"]
    assert routing["num_modules"] == rescored["num_modules"] == 4 * 7
    assert routing["avg_active_experts"] == pytest.approx(rescored["avg_active_experts"], rel=1e-5)
    assert routing["per_module_type"].keys() == rescored["per_module_type"].keys()
    for module_type, values in rescored["per_module_type"].items():
        assert routing["per_module_type"][module_type] == pytest.approx(values, rel=1e-5), module_type
    assert set(routing["per_module_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(routing["per_layer"]) == {"0", "1", "2", "3"}
    assert {"mean", "quantiles"} <= set(routing["lambda"]) and routing["zero_activation_rate"] == 0.0
    for name in ("config.yaml", "log.jsonl", "adapter/adapter.safetensors", "adapter/mole_config.json",
                 "adapter_epoch1/adapter.safetensors"):
        assert (tmp_path / name).is_file(), f"{name} missing from the run directory"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "task" in e] == [SMOKE_LOG_EVERY, SMOKE_STEPS] and all("lb" in e for e in log if "task" in e)


@pytest.mark.slow
def test_remole_per_layer_experts_controller_steps_once_per_optimiser_step(tmp_path):
    """method=remole with mole.num_experts='2468' trains, and l1_coef moves by rate^±1 per optimiser step
    (accumulation 2: updating per micro-batch would move it by an even power every step)."""
    from ldmole.experiment.trainer import train

    config = compose_config(tiny_run("method=remole", "mole.num_experts='2468'", f"output_dir={tmp_path}",
                                               "train_max_examples=16", "eval_max_examples=4", "batch_size=4",
                                               "per_device_batch_size=2", "eval_batch_size=4", "max_steps=5",
                                               "log_every=1", "mole.target_modules=[q_proj, down_proj]"))
    metrics = train(config)
    assert metrics.steps == 5
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    coefs = [(e["step"], e["l1_coef"]) for e in log if "l1_coef" in e]
    assert [s for s, _ in coefs] == [1, 2, 3, 4, 5]
    powers = [math.log(c / 1e-8) / math.log(1.2) for _, c in coefs]
    assert all(abs(p - round(p)) < 1e-3 for p in powers), powers
    previous = 0
    for step, power in zip(range(1, 6), map(round, powers)):
        assert abs(power - previous) == 1, f"step {step}: l1_coef moved by 1.2^{power - previous}, not 1.2^±1"
        previous = power
