"""The typed run configuration, its documentation (docs/config.md, --help), the metrics.json schema and the
trainer's state."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from ldmole.experiment.data import TASKS
from ldmole.experiment.metrics import RunMetrics
from ldmole.experiment.run_config import (RunConfig, available, compose_config, describe_keys, format_value,
                                         key_table_markdown)
from ldmole.experiment.trainer import TrainState, routing_loss_terms
from tests.helpers import REPO_ROOT


CONFIG_DOC = REPO_ROOT / "docs" / "config.md"
REGENERATE = 'python -c "from ldmole.experiment.run_config import key_table_markdown as t; print(t())"'


def documented_rows() -> dict[str, tuple[str, str]]:
    """Key -> (default, meaning) of each row of the key table in docs/config.md's generated block."""
    text = CONFIG_DOC.read_text()
    block = text.split("<!-- generated: CONFIG_KEYS", 1)[1].split("\n", 1)[1].split("<!-- end: CONFIG_KEYS -->")[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| `"):
            key, default, meaning = re.fullmatch(r"\| `([^`]+)` \| `(.*?)` \| (.*) \|", line).groups()
            rows[key] = (default, meaning.replace("\\|", "|").replace("\\<", "<"))
    return rows


def test_config_doc_lists_exactly_the_fields():
    fields = {key for key, _, _ in describe_keys()}
    documented = set(documented_rows())
    assert not fields - documented, f"keys missing from docs/config.md (regenerate: {REGENERATE}): " \
                                    f"{sorted(fields - documented)}"
    assert not documented - fields, f"docs/config.md lists unknown keys: {sorted(documented - fields)}"


def test_config_doc_shows_each_keys_default_and_help_text_as_declared():
    rows = documented_rows()
    for key, default, help_text in describe_keys():
        assert rows[key] == (format_value(default), help_text), \
            f"docs/config.md's row of {key} differs from its field (regenerate the table: {REGENERATE})"


def test_config_doc_table_is_the_generated_one():
    assert key_table_markdown() in CONFIG_DOC.read_text(), f"regenerate docs/config.md's table: {REGENERATE}"


@pytest.mark.parametrize("value, text", [
    (-2.5, "-2.5"), (0.0, "0.0"), (1e-4, "1e-4"), (1e-8, "1e-8"), (0.1, "0.1"), (16.0, "16.0"), (1.0, "1.0"),
    (3, "3"), (None, "null"), (True, "true"), ("x", "x"), ([6, 8], "[6, 8]"), ({}, "{}"),
])
def test_defaults_are_written_as_they_are_typed(value, text):
    assert format_value(value) == text
    if isinstance(value, float):
        assert float(text) == value, "the text must read back as the same number"


def test_every_field_has_a_help_text():
    assert all(help_text.strip() for _, _, help_text in describe_keys())


@pytest.mark.parametrize("model", available("models"))
@pytest.mark.parametrize("method", available("methods"))
def test_config_yaml_round_trips(model, method):
    config = compose_config([f"model={model}", f"method={method}", "lr=3e-4", "mole.r=4"])
    assert RunConfig.from_flat(yaml.safe_load(yaml.safe_dump(config.to_flat(), sort_keys=False))) == config


def test_every_registered_task_composes_and_task_files_are_gone():
    assert not (REPO_ROOT / "configs" / "tasks").exists()
    for task in TASKS:
        assert compose_config([f"task={task}"]).task == task


@pytest.mark.parametrize("argument, message", [
    ("batch_size=big", "batch_size='big' must be an int"),
    ("lr=fast", "lr='fast' must be a number"),
    ("mixed_precision=fp8", "mixed_precision='fp8' is unknown"),
    ("chat_format=qwen", "chat_format='qwen' is unknown (did you mean 'qwen3'"),
    ("save_epoch_adapters=2", "save_epoch_adapters=2 must be a list"),
])
def test_bad_values_name_the_key(argument, message):
    with pytest.raises(ValueError) as error:
        compose_config([argument])
    assert message in str(error.value)


def test_values_keep_their_types():
    config = compose_config(["lr=1e-4", "mixed_precision=no", "lb_coef=0"])
    assert config.optim.lr == 1e-4 and config.optim.mixed_precision == "no"
    assert isinstance(config.losses.lb_coef, float)


def test_loss_terms_come_from_the_method():
    names = {method: [t.name for t in routing_loss_terms(config, controller=None)]
             for method, config in ((m, compose_config([f"method={m}", "z_coef=0.01"]))
                                    for m in ("ldmole_sparse_k2", "mola_8888", "softmax"))}
    assert names == {"ldmole_sparse_k2": ["lb", "sparsity", "z"], "mola_8888": ["z"], "softmax": ["lb", "z"]}
    sparse = {t.name: t.coef for t in routing_loss_terms(compose_config(["method=ldmole_sparse_k2"]), None)}
    assert sparse == {"lb": 1.0, "sparsity": 0.1}, "docs/study_smollm2.md: 0.1 reaches ~2 experts, 1.0 overshoots"


def test_run_metrics_round_trip_and_name_missing_keys():
    metrics = RunMetrics(model="m", task="cola", method="ldmole", seed=1, accuracy=0.5, mcc=0.1,
                         routing={"avg_active_experts": 2.0})
    data = metrics.to_dict()
    assert "mcc" in data and "f1" not in data and "per_category" not in data
    assert RunMetrics.from_json(metrics.to_json()) == metrics
    with pytest.raises(ValueError, match="has no 'accuracy'"):
        RunMetrics.from_json('{"model": "m", "task": "t", "method": "x", "seed": 1}')
    with pytest.raises(ValueError, match=r"unknown keys \['acc'\]"):
        RunMetrics.from_json('{"model": "m", "task": "t", "method": "x", "seed": 1, "accuracy": 1, "acc": 1}')


def test_train_state_round_trips_through_torch_save(tmp_path):
    state = TrainState(step=7, epoch=2, batches_done=3, history=[{"epoch": 1, "step": 4, "selection_accuracy": 0.5}],
                       best_accuracy=0.5, best_epoch=1, best_state={"w": torch.ones(2)})
    torch.save(state.state_dict(), tmp_path / "state.pt")
    restored = TrainState()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (restored.step, restored.epoch, restored.batches_done, restored.history, restored.best_epoch) == \
        (7, 2, 3, state.history, 1)
    torch.testing.assert_close(restored.best_state["w"], torch.ones(2))
