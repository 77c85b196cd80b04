"""ldmole-eval and ldmole-generate on a tiny trained run: reproducing its metrics.json exactly,
scoring an evaluation-only task (HellaSwag) as a rescoring apart from the command does, a per-token trace."""

from __future__ import annotations

import json

import pytest

from ldmole.cli import evaluate, generate
from ldmole.experiment.run_config import compose_config
from tests.helpers import SHARED_DATA, needs_data, rescore, run_command, tiny_run


@pytest.fixture(scope="module")
def arc_e_run(tmp_path_factory):
    """A finished 3-step LD-MoLE run of the tiny Qwen3 on ARC-Easy, scored on 12 examples in batches of 5."""
    from ldmole.experiment.trainer import train

    out = tmp_path_factory.mktemp("tiny_arc_e_run")
    train(compose_config(tiny_run("method=ldmole", f"output_dir={out}", "max_steps=3",
                                                        "train_max_examples=32", "selection_size=8",
                                                        "eval_max_examples=12", "eval_batch_size=5", task="arc_e")))
    return out


@pytest.mark.slow
@needs_data
def test_eval_on_the_runs_own_split_reproduces_metrics_json_exactly(arc_e_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main([str(arc_e_run), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    metrics = json.loads((arc_e_run / "metrics.json").read_text())
    assert result["num_examples"] == metrics["num_eval_examples"] == 12 and result["batch_size"] == 5
    assert result["accuracy"] == metrics["accuracy"]
    assert result["prediction_counts"] == metrics["prediction_counts"]
    assert result["routing"]["avg_active_experts"] == metrics["routing"]["avg_active_experts"]
    assert result["routing"]["per_layer"] == metrics["routing"]["per_layer"]
    assert result["routing"]["lambda"]["mean"] == metrics["routing"]["lambda"]["mean"]
    assert result["reproduces_metrics_json"] is True and "reproduces metrics.json" in printed
    metrics_json = (arc_e_run / "metrics.json").read_text()
    assert evaluate.main([str(arc_e_run), "--device", "cpu", "--out", str(arc_e_run / "metrics.json")]) == 2
    assert "pass --force" in capsys.readouterr().err and (arc_e_run / "metrics.json").read_text() == metrics_json


@pytest.mark.slow
@needs_data
def test_eval_scores_an_arc_e_adapter_on_hellaswag_which_has_no_train_split(arc_e_run, tmp_path):
    out = tmp_path / "hellaswag.json"
    result = run_command("ldmole.cli.evaluate", [str(arc_e_run / "adapter"), "--task", "hellaswag", "--max-examples",
                                                 "16", "--data-dir", str(SHARED_DATA), "--device", "cpu",
                                                 "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(out.read_text())
    assert (scored["task"], scored["trained_task"], scored["split"]) == ("hellaswag", "arc_e", "evaluation")
    assert scored["num_examples"] == 16 and sum(scored["label_counts"].values()) == 16
    assert set(scored["prediction_counts"]) <= {"0", "1", "2", "3"}
    # The same 16 examples scored here, apart from ldmole-eval: the same accuracy and routing.
    accuracy, routing = rescore(arc_e_run / "adapter", compose_config(tiny_run(task="hellaswag", data_dir=SHARED_DATA)),
                                limit=16, source=True)
    assert scored["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert scored["routing"]["num_modules"] == routing["num_modules"] == 4 * 7
    assert scored["routing"]["avg_active_experts"] == pytest.approx(routing["avg_active_experts"], rel=1e-5)
    for layer, values in routing["per_layer"].items():
        assert scored["routing"]["per_layer"][layer] == pytest.approx(values, rel=1e-5), f"layer {layer}"
    assert "on hellaswag evaluation: accuracy" in result.stdout and "reproduces" not in result.stdout


@pytest.mark.slow
@needs_data
def test_generate_prints_text_and_a_per_token_trace(arc_e_run, tmp_path, capsys):
    trace_path = tmp_path / "trace.json"
    status = generate.main([str(arc_e_run), "--prompt", "Which is hot?", "--max-new-tokens", "4", "--trace",
                            "--trace-json", str(trace_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    saved = json.loads(trace_path.read_text())
    assert saved["chat_format"] == "qwen3" and 1 <= len(saved["tokens"]) <= 4
    # Recompute the trace apart from generate: one forward without the KV cache over the prompt and the
    # generated tokens; the routing at the position that predicted token t is that token's trace entry.
    import torch

    from ldmole.core.records import routing_records
    from ldmole.experiment.data import get_chat_format
    from ldmole.experiment.data.features import encode_prompt
    from ldmole.experiment.pretrained import from_pretrained, load_adapter_tokenizer

    model = from_pretrained(arc_e_run / "adapter")
    prompt = encode_prompt("Which is hot?", load_adapter_tokenizer(arc_e_run / "adapter"), get_chat_format("qwen3"))
    generated = [entry["token_id"] for entry in saved["tokens"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + generated])).logits[0]
    records = routing_records(model)
    for t, entry in enumerate(saved["tokens"]):
        position = len(prompt) + t - 1
        assert int(logits[position].argmax()) == entry["token_id"], "the trace's tokens are the greedy ones"
        assert set(entry["layers"]) == {"0", "1", "2", "3"}
        for layer, traced in entry["layers"].items():
            mine = [r for r in records if r.layer_index == int(layer)]
            active = sum(int((r.weights[0, position] > 0).sum()) for r in mine) / len(mine)
            lam = sum(float(r.lam[0, position]) for r in mine) / len(mine)
            assert traced["active_experts"] == pytest.approx(active, abs=1e-9), f"token {t}, layer {layer}"
            assert traced["lambda_mean"] == pytest.approx(lam, abs=1e-4), f"token {t}, layer {layer}"
    assert "then λ per layer" in printed and printed.count("active/layer") == len(saved["tokens"])
