"""Adapter files: a weight missing from or extra in ``adapter.safetensors`` is an error, never a silent load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmole import MoLEConfig, get_mole_model, load_mole, save_mole
from ldmole.core.adapter_io import WEIGHTS_NAME, atomic_write
from tests.helpers import tiny_model


def saved_adapter(directory) -> dict[str, torch.Tensor]:
    """Saves a tiny Qwen3 topk adapter to ``directory`` and returns its tensors."""
    save_mole(get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="topk", num_experts=2, r=2)), directory)
    return load_file(str(directory / WEIGHTS_NAME))


def test_load_rejects_an_adapter_with_a_missing_weight(tmp_path):
    tensors = saved_adapter(tmp_path)
    missing = sorted(tensors)[0]
    del tensors[missing]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"does not fit this model: missing \\['{missing}'\\]"):
        load_mole(tiny_model("qwen3", num_layers=2), tmp_path)


def test_load_rejects_an_adapter_with_an_unexpected_weight(tmp_path):
    tensors = saved_adapter(tmp_path)
    tensors["model.layers.9.mlp.up_proj.lora_A"] = torch.zeros(2, 2, 32)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.9.mlp.up_proj.lora_A'\]"):
        load_mole(tiny_model("qwen3", num_layers=2), tmp_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing_write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing_write)
    assert target.read_text() == "old", "a failed write must leave the previous file intact"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "the temporary file must be removed"
