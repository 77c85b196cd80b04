"""Adapter files: a weight missing from or extra in ``adapter.safetensors`` is an error, never a silent load;
so is an adapter of another architecture. Files and folders are written whole, with the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldmole import MoLEConfig, get_mole_model, load_mole, mole_layers, save_mole
from ldmole.core.adapter_io import CONFIG_NAME, WEIGHTS_NAME, atomic_write
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


@pytest.fixture
def umask_022():
    """The process umask set to 022 for the test (files 0644, directories 0755), restored after."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_gives_the_file_the_umask_permissions_not_0600(tmp_path, umask_022):
    target = tmp_path / "metrics.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o644, "colleagues must be able to read the file (umask 022)"


def test_atomic_directory_replaces_a_folder_whole_or_leaves_it_untouched(tmp_path, umask_022):
    from ldmole.core.adapter_io import atomic_directory

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash")
    assert [p.name for p in target.iterdir()] == ["old.txt"], "a failed write must leave the folder untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "the temporary folder must be removed"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.")
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"], "the folder is replaced as a whole"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary or old folder is left beside it"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755, "the folder gets the umask's permissions, not mkdtemp's 0700"


def test_save_mole_failing_midway_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    saved_adapter(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    other = get_mole_model(tiny_model("qwen3", num_layers=2, seed=1), MoLEConfig(router="softmax", num_experts=2, r=2))

    def disk_full(self) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(MoLEConfig, "to_json", disk_full)  # the weights are written, then the config fails
    with pytest.raises(OSError, match="disk full"):
        save_mole(other, tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    assert after == before, "weights and config must stay the previous matching pair"


def test_save_mole_refuses_a_folder_holding_other_files_and_clears_leftover_temp_files(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / ".adapter.safetensors.abc123.tmp").write_bytes(b"left by a crash")
    saved_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME]), \
        "a leftover temp file is dropped with the old folder"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not an adapter's: \['notes.txt'\]"):
        saved_adapter(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine", "a user's file must never be deleted"


def test_write_mole_files_writes_into_an_existing_directory_keeping_its_other_files(tmp_path):
    from ldmole.core.adapter_io import write_mole_files

    (tmp_path / "trainer_state.pt").write_bytes(b"state")
    model = get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="topk", num_experts=2, r=2))
    write_mole_files(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME, "trainer_state.pt"]
    load_mole(tiny_model("qwen3", num_layers=2), tmp_path)
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        write_mole_files(model, tmp_path / "missing")


def test_adapter_of_a_qwen3_refuses_a_llama_base_of_the_same_widths(tmp_path):
    saved_adapter(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata()["base_model_type"] == "qwen3"
    llama = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match=r"trained on a Qwen3ForCausalLM \(model_type 'qwen3'\) base, but the model "
                                         r"is a LlamaForCausalLM \(model_type 'llama'\).*check_base=False"):
        load_mole(llama, tmp_path)
    assert not mole_layers(llama), "a refused load must leave the model untouched"
    load_mole(llama, tmp_path, check_base=False)  # the expert's override: names and shapes fit
    assert mole_layers(llama)


def test_adapter_recording_only_its_class_refuses_another_architecture_but_not_another_head(tmp_path):
    tensors = saved_adapter(tmp_path)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"format": "ldmole-adapter-v1",
                                                                "base_model_class": "Qwen3ForSequenceClassification"})
    with pytest.raises(ValueError, match="Qwen3ForSequenceClassification base, but the model is a LlamaForCausalLM"):
        load_mole(tiny_model("llama", num_layers=2), tmp_path)
    load_mole(tiny_model("qwen3", num_layers=2), tmp_path)  # the same architecture with another head class
