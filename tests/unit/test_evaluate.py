"""ldmole-eval: the splits it scores, reproducing a tiny run's metrics.json exactly, evaluation-only
tasks (HellaSwag), clear refusals; ldmole-generate on the same run."""

from __future__ import annotations

import json
import stat


from ldmole.cli import evaluate, generate
from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.run import Run
from tests.helpers import DATA_DIR, SHARED_DATA, needs_data, scaled, tiny_run, tiny_run_config, trained_tiny_model


def info_only_adapter(folder, **fields) -> str:
    """An adapter folder holding only adapter_info.json (enough for the checks made before loading)."""
    values = dict(base_model="random:qwen3", model_kind="causal_lm", method="ldmole", task="arc_e", chat_format="qwen3",
                  ldmole_version="test", tokenizer=str(SHARED_DATA / "tokenizers" / "qwen3"))
    values.update(fields)
    AdapterInfo(**values).write(folder)
    return str(folder)


@needs_data
def test_evaluation_and_selection_splits_are_the_runs_own():
    run = Run(compose_config(tiny_run("selection_size=20", "seed=3", task="arc_e")))
    evaluation = run.source_examples("evaluation")
    assert [e.uid for e in evaluation] == [e.uid for e in run.examples("evaluation")]
    assert [e.prompt for e in run.source_examples("validation")] == [e.prompt for e in evaluation]
    assert [e.uid for e in run.source_examples("selection")] == [e.uid for e in run.examples("selection")]


def test_selection_scores_rows_carved_from_training_that_training_never_sees():
    size = scaled(20, 2)

    def run(seed: int) -> Run:
        return Run(compose_config(tiny_run(f"selection_size={size}", f"seed={seed}", task="arc_e")))

    first, again, other = run(3), run(3), run(4)
    selection = [e.uid for e in first.examples("selection")]
    trained = {e.uid for e in first.task_data().train}
    assert len(selection) == len(set(selection)) == size
    assert not set(selection) & trained, "selection rows must never be trained on"
    assert not set(selection) & {e.uid for e in first.examples("train")}
    # The carve splits the source training split: selection and training rows together are all of it.
    assert set(selection) | trained == {e.uid for e in first.source_examples("train")}
    assert [e.uid for e in again.examples("selection")] == selection, "the same seed carves the same rows"
    assert [e.uid for e in other.examples("selection")] != selection, "another seed carves other rows"


@needs_data
def test_mmlu_pro_source_splits_are_its_carves():
    run = Run(compose_config(tiny_run(task="mmlu_pro")))
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

    flat = compose_config(tiny_run(task="arc_e")).to_flat()
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
