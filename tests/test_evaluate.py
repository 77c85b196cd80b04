"""ldmole-eval: the splits it scores, reproducing a tiny run's metrics.json exactly, evaluation-only
tasks (HellaSwag), clear refusals; ldmole-generate on the same run."""

from __future__ import annotations

import json
import stat

import pytest

from ldmole.cli import evaluate, generate
from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.run import Run
from tests.helpers import DATA_DIR, SHARED_DATA, needs_data, run_command, tiny_run_args


def info_only_adapter(folder, **fields) -> str:
    """An adapter folder holding only adapter_info.json (enough for the checks made before loading)."""
    values = dict(base_model="random:qwen3", model_kind="causal_lm", method="ldmole", task="arc_e", chat_format="qwen3",
                  ldmole_version="test", tokenizer=str(SHARED_DATA / "tokenizers" / "qwen3"))
    values.update(fields)
    AdapterInfo(**values).write(folder)
    return str(folder)


@needs_data
def test_evaluation_and_selection_splits_are_the_runs_own():
    run = Run(compose_config(tiny_run_args(task="arc_e") + ["selection_size=20", "seed=3"]))
    evaluation = run.source_examples("evaluation")
    assert [e.uid for e in evaluation] == [e.uid for e in run.examples("evaluation")]
    assert [e.prompt for e in run.source_examples("validation")] == [e.prompt for e in evaluation]
    assert [e.uid for e in run.source_examples("selection")] == [e.uid for e in run.examples("selection")]


@needs_data
def test_mmlu_pro_source_splits_are_its_carves():
    run = Run(compose_config(tiny_run_args(task="mmlu_pro")))
    task = run.task_data()
    assert [e.prompt for e in run.source_examples("test")] == [e.prompt for e in task.evaluation]
    assert [e.prompt for e in run.source_examples("validation")] == [e.prompt for e in task.selection]


@needs_data
def test_selection_split_of_a_task_without_training_data_names_the_fix(tmp_path, capsys):
    status = evaluate.main([info_only_adapter(tmp_path), "--task", "hellaswag", "--split", "selection",
                            "--data-dir", str(SHARED_DATA), "--device", "cpu"])
    assert status == 2 and "use --split evaluation" in capsys.readouterr().err


def test_a_task_needing_another_head_is_refused_before_loading(tmp_path, capsys):
    folder = info_only_adapter(tmp_path, model_kind="classification", task="rte", num_labels=2)
    assert evaluate.main([folder, "--task", "arc_e"]) == 2
    err = capsys.readouterr().err
    assert "--task arc_e" in err and "classification head" in err and "classification task with 2 labels" in err


def test_a_config_yaml_with_the_retired_task_name_key_is_refused(tmp_path, capsys):
    import yaml

    flat = compose_config(tiny_run_args(task="arc_e")).to_flat()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**flat, "task_name": "arc_e"}))
    (tmp_path / "adapter").mkdir()
    info_only_adapter(tmp_path / "adapter")
    assert evaluate.main([str(tmp_path), "--max-examples", "1"]) == 2
    assert "unknown key 'task_name'" in capsys.readouterr().err


def test_a_path_that_is_no_run_nor_adapter_is_refused(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_out_refuses_an_existing_file_unless_force(tmp_path, capsys):
    folder = info_only_adapter(tmp_path / "adapter")
    out = tmp_path / "metrics.json"
    out.write_text('{"accuracy": 0.75}')
    # A bad --max-examples as well, so that nothing is ever loaded: --out is checked first.
    assert evaluate.main([folder, "--max-examples", "-1", "--out", str(out)]) == 2
    assert f"--out {out} already exists; pass --force" in capsys.readouterr().err
    # --force gets past the check, to the next one.
    assert evaluate.main([folder, "--max-examples", "-1", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "--max-examples -1 must be 0 (all) or positive" in err and "--out" not in err
    assert out.read_text() == '{"accuracy": 0.75}', "a refused or failed evaluation must leave --out as it was"


def test_eval_scores_an_adapter_folder_alone_with_the_tokenizer_saved_in_it(tmp_path):
    from ldmole.core.adapter_io import current_umask
    from ldmole.experiment.data import get_task
    from ldmole.experiment.pretrained import save_adapter
    from tests.test_sharing import tiny_run_config, trained_tiny_model

    config = tiny_run_config()
    save_adapter(trained_tiny_model(config), tmp_path / "adapter", AdapterInfo.from_run(config, get_task("arc_e")))
    assert AdapterInfo.read(tmp_path / "adapter").tokenizer is None, "no local tokenizer path is recorded"
    out = tmp_path / "eval.json"
    assert evaluate.main([str(tmp_path / "adapter"), "--data-dir", str(DATA_DIR), "--max-examples", "2",
                          "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_examples"] == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~current_umask(), "written with the umask's permissions"


def test_generate_refuses_a_classification_adapter(tmp_path, capsys):
    folder = info_only_adapter(tmp_path, model_kind="classification", task="rte", num_labels=2)
    assert generate.main([folder, "--prompt", "hi"]) == 2
    assert "cannot generate" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-step LD-MoLE run of the tiny Qwen3 on ARC-Easy, scored on 12 examples in batches of 5."""
    from ldmole.experiment.trainer import train

    out = tmp_path_factory.mktemp("tiny_arc_e_run")
    train(compose_config(tiny_run_args(task="arc_e") + ["method=ldmole", f"output_dir={out}", "max_steps=3",
                                                        "train_max_examples=32", "selection_size=8",
                                                        "eval_max_examples=12", "eval_batch_size=5"]))
    return out


@pytest.mark.slow
@needs_data
def test_eval_on_the_runs_own_split_reproduces_metrics_json_exactly(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main([str(tiny_run), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert result["num_examples"] == metrics["num_eval_examples"] == 12 and result["batch_size"] == 5
    assert result["accuracy"] == metrics["accuracy"]
    assert result["prediction_counts"] == metrics["prediction_counts"]
    assert result["routing"]["avg_active_experts"] == metrics["routing"]["avg_active_experts"]
    assert result["routing"]["per_layer"] == metrics["routing"]["per_layer"]
    assert result["routing"]["lambda"]["mean"] == metrics["routing"]["lambda"]["mean"]
    assert result["reproduces_metrics_json"] is True and "reproduces metrics.json" in printed
    metrics_json = (tiny_run / "metrics.json").read_text()
    assert evaluate.main([str(tiny_run), "--device", "cpu", "--out", str(tiny_run / "metrics.json")]) == 2
    assert "pass --force" in capsys.readouterr().err and (tiny_run / "metrics.json").read_text() == metrics_json


@pytest.mark.slow
@needs_data
def test_eval_scores_an_arc_e_adapter_on_hellaswag_which_has_no_train_split(tiny_run, tmp_path):
    out = tmp_path / "hellaswag.json"
    result = run_command("ldmole.cli.evaluate", [str(tiny_run / "adapter"), "--task", "hellaswag", "--max-examples",
                                                 "16", "--data-dir", str(SHARED_DATA), "--device", "cpu",
                                                 "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(out.read_text())
    assert (scored["task"], scored["trained_task"], scored["split"]) == ("hellaswag", "arc_e", "evaluation")
    assert scored["num_examples"] == 16 and sum(scored["label_counts"].values()) == 16
    assert set(scored["prediction_counts"]) <= {"0", "1", "2", "3"} and 0.0 <= scored["accuracy"] <= 1.0
    assert scored["routing"]["num_modules"] == 4 * 7 and 1.0 <= scored["routing"]["avg_active_experts"] <= 8.0
    assert "on hellaswag evaluation: accuracy" in result.stdout and "reproduces" not in result.stdout


@pytest.mark.slow
@needs_data
def test_generate_prints_text_and_a_per_token_trace(tiny_run, tmp_path, capsys):
    trace_path = tmp_path / "trace.json"
    status = generate.main([str(tiny_run), "--prompt", "Which is hot?", "--max-new-tokens", "4", "--trace",
                            "--trace-json", str(trace_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    saved = json.loads(trace_path.read_text())
    assert saved["chat_format"] == "qwen3" and 1 <= len(saved["tokens"]) <= 4
    for entry in saved["tokens"]:
        assert set(entry["layers"]) == {"0", "1", "2", "3"}
        assert all(1.0 <= v["active_experts"] <= 8.0 and "lambda_mean" in v for v in entry["layers"].values())
    assert "then λ per layer" in printed and printed.count("active/layer") == len(saved["tokens"])
