"""A MoLE adapter evaluated by lm-evaluation-harness (``mole_lm``), offline, on a task over a local file."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.lm_eval_adapter import mole_lm

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm_eval (lm-evaluation-harness) is not installed: "
                                          "pip install 'lm_eval>=0.4,<0.5' or pip install -e '.[lm-eval]'")


@needs_lm_eval
def test_mole_lm_refuses_a_classification_adapter(tmp_path):
    AdapterInfo(base_model="random:qwen3", model_kind="classification", method="ldmole", task="rte",
                chat_format="qwen3", ldmole_version="0.2.0", num_labels=2).write(tmp_path)
    with pytest.raises(ValueError, match="causal language models only"):
        mole_lm(tmp_path)


def test_mole_lm_without_lm_eval_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # None makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'lm_eval>=0.4,<0.5'"):
        mole_lm(tmp_path)
