"""A router added from outside the package trains through the trainer."""

from __future__ import annotations

import json

import pytest

from tests.helpers import DATA_DIR, tokenizer_dir
from tests.unit.test_router_registry import SigmoidTop1Router  # noqa: F401  (registers test_sigmoid_top1)


@pytest.mark.slow
def test_outside_router_trains_through_the_trainer(tmp_path):
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.trainer import train

    train(compose_config([
        "model=tiny_qwen3", "task=arc_e", "method=softmax", "mole.router=test_sigmoid_top1", "lb_coef=1.0",
        "z_coef=0.01", f"data_dir={DATA_DIR}", f"tokenizer={tokenizer_dir('qwen3')}", "max_steps=2",
        "train_max_examples=8", "eval_max_examples=4", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=4", "log_every=1", "save_epoch_adapters=[]", "mixed_precision=no", f"output_dir={tmp_path}",
    ]))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"lb"' in line]
    assert log and all("z" in entry and "l1" not in entry for entry in log), "its aux losses: lb and z, no ReMoLE L1"
    assert json.loads((tmp_path / "adapter" / "mole_config.json").read_text())["router"] == "test_sigmoid_top1"
    assert (tmp_path / "metrics.json").is_file()
