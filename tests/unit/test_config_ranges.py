"""Every bad setting is a named error when the config is composed, or when a section is built in code: ranges,
list elements, choices (each list defined once), path keys taken as written, YAML syntax errors, overwrite with
resume, and run.sh's integer variables."""

from __future__ import annotations

import os
import subprocess
import typing

import pytest

from ldmole.experiment.data.splits import PROTOCOLS
from ldmole.experiment.precision import MIXED_PRECISIONS, autocast_for
from ldmole.experiment.run_config import (PATH_KEYS, BackboneConfig, DataConfig, LoggingConfig,
                                         LossConfig, OptimConfig, RunConfig, allowed_range, compose_config,
                                         describe_keys, flat_keys)
from tests.helpers import REPO_ROOT

TINY = ["model=tiny_qwen3", "task=arc_c", "method=ldmole"]


def compose_error(*arguments: str) -> str:
    """The ValueError message of composing the tiny config with ``arguments``."""
    with pytest.raises(ValueError) as error:
        compose_config([*TINY, *arguments])
    return str(error.value)


@pytest.mark.parametrize("argument, message", [
    ("num_epochs=0", "num_epochs=0 must be >= 1"),
    ("max_steps=0", "max_steps=0 must be >= 1 (or null = no cap)"),
    ("max_steps=-1", "max_steps=-1 must be >= 1 (or null = no cap)"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("per_device_batch_size=0", "per_device_batch_size=0 must be >= 1"),
    ("eval_batch_size=0", "eval_batch_size=0 must be >= 1"),
    ("lr=-1", "lr=-1.0 must be > 0"),
    ("lr=0", "lr=0.0 must be > 0"),
    ("lr=nan", "lr=nan must be > 0"),
    ("lr=.inf", "lr=inf must be a finite number"),
    ("weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
    ("grad_clip=-1", "grad_clip=-1.0 must be > 0"),
    ("lr_gamma=-1", "lr_gamma=-1.0 must be > 0"),
    ("warmup_steps=-1", "warmup_steps=-1 must be >= 0"),
    ("label_smoothing=2", "label_smoothing=2.0 must be in [0, 1)"),
    ("label_smoothing=1", "label_smoothing=1.0 must be in [0, 1)"),
    ("seed=-1", "seed=-1 must be in [0, 4294967295]"),
    ("seed=4294967296", "seed=4294967296 must be in [0, 4294967295]"),
    ("max_length=0", "max_length=0 must be >= 1 (or null = the task's"),
    ("train_max_examples=0", "train_max_examples=0 must be >= 1 (or null = all)"),
    ("eval_max_examples=-1", "eval_max_examples=-1 must be >= 1 (or null = all)"),
    ("selection_size=0", "selection_size=0 must be >= 1 (or null = min(500"),
    ("log_every=0", "log_every=0 must be >= 1"),
    ("save_every=-1", "save_every=-1 must be >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints=0 must be >= 1"),
    ("lb_coef=-1", "lb_coef=-1.0 must be >= 0"),
    ("sparsity_coef=-1", "sparsity_coef=-1.0 must be >= 0"),
    ("z_coef=-1", "z_coef=-1.0 must be >= 0"),
    ("sparsity_k=0", "sparsity_k=0 must be >= 1"),
    ("remole_initial_coef=0", "remole_initial_coef=0.0 must be > 0"),
    ("remole_rate=1", "remole_rate=1.0 must be > 1"),
    ("lr_milestones=[0,8]", "lr_milestones=[0, 8] must be a list of ints >= 1; 0 is not"),
    ("lr_milestones=[a]", "lr_milestones=['a'] must be a list of ints >= 1; 'a' is not"),
    ("save_epoch_adapters=[0]", "save_epoch_adapters=[0] must be a list of ints >= 1; 0 is not"),
    ("save_epoch_adapters=[1.5]", "save_epoch_adapters=[1.5] must be a list of ints >= 1; 1.5 is not"),
    ("save_epoch_adapters=[true]", "save_epoch_adapters=[True] must be a list of ints >= 1; True is not"),
    ("torch_dtype=foo", "torch_dtype='foo' is unknown; choose one of ('float32', 'bfloat16', 'float16')"),
    ("lr_milestones=[6", "argument 'lr_milestones=[6' is not valid YAML ("),
    ("mole.r={", "argument 'mole.r={' is not valid YAML ("),
])
def test_a_bad_setting_is_a_named_error_when_composed(argument, message):
    assert message in compose_error(argument)


@pytest.mark.parametrize("argument, key, value", [
    ("max_steps=1", "max_steps", 1), ("max_steps=", "max_steps", None), ("label_smoothing=0", "label_smoothing", 0.0),
    ("seed=0", "seed", 0), ("seed=4294967295", "seed", 2**32 - 1), ("save_every=0", "save_every", 0),
    ("warmup_steps=0", "warmup_steps", 0), ("lb_coef=0", "lb_coef", 0.0), ("lr_milestones=[]", "lr_milestones", []),
    ("torch_dtype=bfloat16", "torch_dtype", "bfloat16"),
])
def test_the_edges_of_each_range_are_accepted(argument, key, value):
    config = compose_config([*TINY, argument]).to_flat()
    assert config[key] == value and type(config[key]) is type(value)


def test_every_number_and_list_of_numbers_declares_its_range():
    for key, (_, spec, hint) in flat_keys().items():
        base = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
        if base in (int, float) or spec.metadata["item_type"] in (int, float):
            assert allowed_range(spec.metadata), f"{key} has no range: give its setting(...) minimum= / maximum="


def test_help_shows_each_range():
    helps = {key: help_text for key, _, help_text in describe_keys()}
    assert helps["max_steps"].endswith("; must be >= 1 or null")
    assert helps["label_smoothing"].endswith("; must be in [0, 1)")
    assert helps["lr"].endswith("; must be > 0") and helps["lr_milestones"].endswith("; must be ints >= 1")


def test_the_path_keys_are_the_fields_declared_with_path_true():
    assert PATH_KEYS == {"output_dir", "data_dir", "tokenizer", "model_source", "resume"}


@pytest.mark.parametrize("argument, key, value", [
    ("output_dir=off", "output_dir", "off"),
    ("output_dir=~", "output_dir", os.path.expanduser("~")),
    ("output_dir=~/runs/a", "output_dir", os.path.join(os.path.expanduser("~"), "runs/a")),
    ("output_dir=[x", "output_dir", "[x"),
    ("data_dir=123", "data_dir", "123"),
    ("tokenizer=yes", "tokenizer", "yes"),
    ("resume=~/ckpt", "resume", os.path.join(os.path.expanduser("~"), "ckpt")),
    ("resume=", "resume", None),
])
def test_path_keys_are_taken_as_written(argument, key, value):
    assert compose_config([*TINY, argument]).to_flat()[key] == value


@pytest.mark.parametrize("section, settings, message", [
    (OptimConfig, {"lr": -1}, "lr=-1.0 must be > 0"),
    (OptimConfig, {"lr_milestones": [0]}, "lr_milestones=[0] must be a list of ints >= 1"),
    (OptimConfig, {"mixed_precision": "fp8"}, "mixed_precision='fp8' is unknown"),
    (DataConfig, {"protocol": "best"}, "protocol='best' is unknown"),
    (DataConfig, {"max_length": 0}, "max_length=0 must be >= 1"),
    (LossConfig, {"sparsity_k": 0}, "sparsity_k=0 must be >= 1"),
    (BackboneConfig, {"torch_dtype": "int8"}, "torch_dtype='int8' is unknown"),
    (LoggingConfig, {"overwrite": True, "resume": "auto"}, "exclude each other"),
    (RunConfig, {"seed": -1}, "seed=-1 must be in [0, 4294967295]"),
    (RunConfig, {"task": "arc-c"}, "unknown task 'arc-c' (did you mean 'arc_c'"),
])
def test_a_section_built_in_code_is_checked_as_one_composed_from_yaml(section, settings, message):
    with pytest.raises(ValueError) as error:
        section(**settings)
    assert message in str(error.value)


def test_a_section_built_in_code_stores_each_value_as_its_type():
    optim = OptimConfig(lr=1, weight_decay=0)
    assert optim.lr == 1.0 and type(optim.lr) is float and type(optim.weight_decay) is float


def test_each_choice_list_is_defined_once():
    keys = flat_keys()
    assert keys["protocol"][1].metadata["choices"] is PROTOCOLS, "protocol choices come from the data splits"
    assert keys["mixed_precision"][1].metadata["choices"] is MIXED_PRECISIONS
    for name in MIXED_PRECISIONS:
        autocast_for(name, "cpu")  # every choice the config accepts is one autocast_for knows
    with pytest.raises(ValueError, match=r"choose one of \('no', 'bf16', 'fp16'\)"):
        autocast_for("fp8", "cpu")


def test_overwrite_is_a_key_and_excludes_resume():
    assert compose_config([*TINY, "overwrite=true"]).logging.overwrite is True
    assert compose_config(TINY).logging.overwrite is False
    message = compose_error("overwrite=true", "resume=auto")
    assert "overwrite=true" in message and "resume='auto'" in message


def run_sh(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """``bash run.sh`` with ``env`` set and stand-ins for accelerate and python that record a launch."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("accelerate", "python"):
        (fake_bin / name).write_text(f'#!/bin/sh\ntouch "{tmp_path}/launched"\n')
        (fake_bin / name).chmod(0o755)
    environment = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(REPO_ROOT / "run.sh")], env=environment, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("variable, value, env, message", [
    ("BATCH_SIZE", "a[$(touch {marker})]", {"NUM_GPUS": "1"}, "must be a positive integer"),
    ("BATCH_SIZE", "NUM_GPUS[$(touch {marker})]", {"NUM_GPUS": "1"}, "must be a positive integer"),
    ("PER_DEVICE_BATCH_SIZE", "NUM_GPUS[$(touch {marker})]", {"NUM_GPUS": "1", "BATCH_SIZE": "16"},
     "must be a positive integer"),
    ("BATCH_SIZE", "0", {"NUM_GPUS": "1"}, "must be a positive integer"),
    ("PER_DEVICE_BATCH_SIZE", "-4", {"NUM_GPUS": "0"}, "must be a positive integer"),
    ("NUM_GPUS", "1+$(touch {marker})", {}, "must be a non-negative integer"),
])
def test_run_sh_rejects_a_count_that_is_not_plain_digits(tmp_path, variable, value, env, message):
    marker = tmp_path / "injected"
    value = value.format(marker=marker)
    result = run_sh(tmp_path, **env, **{variable: value})
    assert result.returncode != 0
    assert f"run.sh: {variable}='{value}' {message}" in result.stderr, result.stderr
    assert not marker.exists(), f"run.sh ran the command inside {variable}"
    assert not (tmp_path / "launched").exists(), "run.sh must fail before launching anything"
