"""A tiny CPU run under ``replicate=reference`` trains with the release's prompt layout and its CPU precision
(float32), records the switch in config.yaml; fp16 on a CPU is refused (accelerate would run float32 under an
fp16 label); a launcher's precision without the key is recorded as what the run used."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ldmole.core.layer import MoLELinear
from ldmole.experiment.run import Run
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import train
from tests.helpers import tiny_run

TINY = ("method=ldmole_reference", "train_max_examples=8", "eval_max_examples=4", "batch_size=4",
        "eval_batch_size=4", "max_steps=2", "log_every=1", "save_epoch_adapters=[]")


@pytest.mark.slow
def test_a_tiny_cpu_run_under_replicate_reference_records_and_uses_the_release_setting(tmp_path, monkeypatch):
    seen_dtypes = []
    original = Run.mole_model

    def hooked_mole_model(self):
        model = original(self)
        layer = next(module for module in model.modules() if isinstance(module, MoLELinear))
        layer.register_forward_hook(lambda *_: seen_dtypes.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), model.training)))
        return model

    monkeypatch.setattr(Run, "mole_model", hooked_mole_model)
    config = compose_config(tiny_run(*TINY, "replicate=reference", "mixed_precision=no", output_dir=tmp_path))
    assert config.backbone.chat_format == "reference_qwen3"
    metrics = train(config)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["replicate"], saved["protocol"], saved["mixed_precision"], saved["mole"]["router_input"]) == \
        ("reference", "reference", "no", "dropout")
    assert saved["per_device_batch_size"] == 4, "the per-device batch the run used is recorded"
    assert metrics.protocol == "reference"
    training = [state[:2] for state in seen_dtypes if state[2]]
    assert training and not any(enabled for enabled, _ in training), "float32, as the release without CUDA"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(entry["task"])) for entry in log if "task" in entry)


@pytest.mark.slow
def test_a_launchers_precision_is_what_the_run_records(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 sets
    train(compose_config(tiny_run(*TINY, "method=softmax", output_dir=tmp_path)))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_fp16_on_a_cpu_is_refused_before_the_model_loads(tmp_path):
    config = compose_config(tiny_run(*TINY, "replicate=reference", output_dir=tmp_path))
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a GPU"):
        train(config)
    assert not (tmp_path / "config.yaml").exists()
