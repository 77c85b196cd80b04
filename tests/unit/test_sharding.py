"""Saving under sharded training (FSDP / ZeRO-3): adapters, checkpoints and the best epoch are taken from
accelerate's gathered state dict, which every process joins, never from a process's own parameter slices.

accelerate applies FSDP only to multi-GPU runs, so the trainer is checked with one process of a
two-process FSDP run played by a fake accelerator whose ``get_state_dict`` records each gather, and the
sharding helpers on really sharded parameters with torch's ``fully_shard`` on two CPU processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import ldmole.experiment.trainer as trainer_module
from ldmole import MoLEConfig, get_mole_model, save_mole
from ldmole.core.adapter_io import WEIGHTS_NAME
from ldmole.core.injection import mole_parameters
from ldmole.experiment.data.tasks import get_task
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.selected_logits import SelectedLogits
from ldmole.experiment.sharding import MODEL_PREFIX, is_sharded, mole_state_from
from ldmole.experiment.trainer import Trainer, TrainState
from tests.helpers import tiny_model


def mole_model() -> torch.nn.Module:
    """A tiny 2-layer Qwen3 with a top-k MoLE adapter."""
    return get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="topk", num_experts=2, r=2))


def test_save_mole_writes_the_given_state_dict_not_the_parameters(tmp_path):
    model = mole_model()
    given = {name: torch.full_like(param, 0.25) for name, param in mole_parameters(model).items()}
    save_mole(model, tmp_path, state_dict=given)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved.keys() == given.keys()
    for name, tensor in given.items():
        assert torch.equal(saved[name], tensor), f"{name}: the file must hold the given weights"
        assert not torch.equal(mole_parameters(model)[name].detach(), tensor)


def test_save_mole_rejects_a_state_dict_that_is_not_exactly_the_mole_weights(tmp_path):
    model = mole_model()
    weights = {name: param.detach() for name, param in mole_parameters(model).items()}
    dropped = sorted(weights)[0]
    with pytest.raises(ValueError, match=f"missing \\['{dropped}'\\]"):
        save_mole(model, tmp_path, state_dict={k: v for k, v in weights.items() if k != dropped})
    with pytest.raises(ValueError, match=r"unexpected \['model.embed_tokens.weight'\]"):
        save_mole(model, tmp_path, state_dict={**weights, "model.embed_tokens.weight": torch.zeros(1)})
    assert not (tmp_path / WEIGHTS_NAME).exists(), "nothing may be written from a wrong state dict"


def test_mole_weights_are_read_from_the_prepared_models_state_dict_by_name():
    base = mole_model()
    picked = mole_state_from(SelectedLogits(base).state_dict(), list(mole_parameters(base)))
    assert picked.keys() == mole_parameters(base).keys()
    for name, param in mole_parameters(base).items():
        assert torch.equal(picked[name], param.detach()), name
    with pytest.raises(KeyError, match="lacks MoLE weights"):
        mole_state_from({}, list(mole_parameters(base)))


class FakeFSDPAccelerator:
    """One process of a two-process FSDP run: ``get_state_dict`` counts the gathers and hands the
    full state only to the main process (as accelerate's FSDP gather with rank0_only does)."""

    distributed_type = DistributedType.FSDP
    num_processes = 2

    def __init__(self, main: bool, full_state: dict[str, torch.Tensor]) -> None:
        self.is_main_process, self.process_index = main, 0 if main else 1
        self.full_state, self.gathers = full_state, 0

    def get_state_dict(self, model):
        self.gathers += 1
        return dict(self.full_state) if self.is_main_process else {}

    def reduce(self, tensor, reduction):
        return tensor

    def gather_for_metrics(self, value):
        return value

    def autocast(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def sharded_trainer(output_dir: Path, main: bool, monkeypatch) -> Trainer:
    """A Trainer holding only what end_epoch / save_checkpoint use, on one process of a fake FSDP run
    whose gathered MoLE weights are all 0.5 (the parameters themselves are not)."""
    base = mole_model()
    gathered = {MODEL_PREFIX + name: torch.full_like(p, 0.5) for name, p in mole_parameters(base).items()}
    trainer = Trainer.__new__(Trainer)
    trainer.accelerator = FakeFSDPAccelerator(main, gathered)
    trainer.config = compose_config(["model=tiny_qwen3", "task=arc_c", "method=ldmole", f"output_dir={output_dir}",
                                     "save_epoch_adapters=[1]", "save_every=1"])
    trainer.base, trainer.wrapped, trainer.main, trainer.sharded = base, SelectedLogits(base), main, True
    trainer.output_dir, trainer.log_path = output_dir, output_dir / "log.jsonl"
    trainer.run = SimpleNamespace(task=get_task("arc_c"), tokenizer=None, examples=lambda split: [])
    trainer.selection_loader, trainer.controller, trainer.bad_modules, trainer.tracking = None, None, [], False
    trainer.state, trainer.total_steps, trainer.base_revision = TrainState(step=3), 10, None
    trainer.first_bad = torch.full((len(trainer_module.LOSS_TERMS),), -1)
    trainer.optimizer, trainer.scheduler = SimpleNamespace(), SimpleNamespace(state_dict=lambda: {})
    output_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args, **kwargs: {"accuracy": 0.5})
    monkeypatch.setattr(trainer_module, "optimizer_state", lambda accelerator, *args: {"gathered_on": accelerator.process_index})
    monkeypatch.setattr(trainer_module, "broadcast_object", lambda accelerator, value: str(output_dir / "checkpoints" / "tmp"))
    (output_dir / "checkpoints" / "tmp").mkdir(parents=True)
    return trainer


def test_fake_fsdp_accelerator_counts_as_sharded():
    assert is_sharded(FakeFSDPAccelerator(True, {}))


def test_every_process_joins_the_gathers_but_only_the_main_one_writes(tmp_path, monkeypatch):
    other = sharded_trainer(tmp_path / "rank1", main=False, monkeypatch=monkeypatch)
    other.end_epoch(1)  # best epoch + adapter_epoch1 + checkpoint: two gathers
    assert other.accelerator.gathers == 2, "a non-main process must join every gather, or FSDP would hang"
    assert other.state.best_state is None and other.state.best_epoch == 1
    assert not (tmp_path / "rank1" / "adapter_epoch1").exists()
    assert not list((tmp_path / "rank1" / "checkpoints").glob("step-*"))


def test_adapters_checkpoints_and_best_epoch_hold_the_gathered_weights(tmp_path, monkeypatch):
    main = sharded_trainer(tmp_path, main=True, monkeypatch=monkeypatch)
    main.end_epoch(1)
    assert main.accelerator.gathers == 2
    names = list(mole_parameters(main.base))
    assert sorted(main.state.best_state) == sorted(names)
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in main.state.best_state.values())
    for folder in (tmp_path / "adapter_epoch1", tmp_path / "checkpoints" / "step-00000003"):
        saved = load_file(str(folder / WEIGHTS_NAME))
        assert sorted(saved) == sorted(names)
        assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in saved.values()), f"{folder}: not the gathered weights"
    state = torch.load(tmp_path / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"] == {"gathered_on": 0}, "the checkpoint must hold the gathered optimiser state"
