"""A short bf16 training run on a CUDA GPU (skipped elsewhere; ``python -m pytest -q -m cuda tests``).
The in-process GPU checks of the layer are in tests/unit/test_cuda.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import DATA_DIR, scaled, tokenizer_dir

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.slow
def test_short_bf16_training_run_on_gpu(tmp_path):
    from ldmole.experiment.run_config import compose_config
    from ldmole.experiment.trainer import train

    config = compose_config(["model=tiny_qwen3", "task=arc_e", "method=ldmole", f"data_dir={DATA_DIR}",
                             f"tokenizer={tokenizer_dir('qwen3')}", f"output_dir={tmp_path}",
                             "mixed_precision=bf16", "max_steps=6", "train_max_examples=48",
                             "eval_max_examples=16", "log_every=2"])
    metrics = train(config)
    assert metrics.steps == 6 and metrics.num_eval_examples == scaled(16, 8)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "task" in line]
    assert all(torch.isfinite(torch.tensor(entry["task"])) for entry in log)
    assert metrics.routing["lambda"]["quantiles"]["q95"] > metrics.routing["lambda"]["quantiles"]["q05"]
