"""One process of a real two-process FSDP2 run on the CPU (gloo), started by tests/test_sharding.py with
``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_worker.py <folder>``.

accelerate 1.15 does not apply FSDP to CPU processes, so the model is sharded with torch's own
``fully_shard`` (what accelerate's FSDP2 does per decoder layer) and the accelerator is a stand-in whose
``get_state_dict`` is accelerate's FSDP2 gather. It exercises ``ldmole.experiment.sharding`` on really
sharded parameters: the gathered weights, the saved adapter, the optimiser state, and loading back.
Any failed check raises, so the process (and the launcher) exits non-zero.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ldmole import MoLEConfig, get_mole_model, load_mole, save_mole
from ldmole.core.injection import mole_parameters
from ldmole.experiment.selected_logits import SelectedLogits
from ldmole.experiment.sharding import (gather_mole_state, is_sharded, load_mole_state, load_optimizer_state,
                                        optimizer_state)
from tests.helpers import tiny_model


class FSDP2Accelerator:
    """The parts of an FSDP2 ``accelerate.Accelerator`` that the sharding helpers use."""

    distributed_type = DistributedType.FSDP

    def __init__(self) -> None:
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.process_index == 0

    def get_state_dict(self, model):
        """accelerate 1.15's ``Accelerator.get_state_dict`` under FSDP2, verbatim."""
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)


def sharded_model() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(prepared model, its base, an unsharded copy made before sharding) of a tiny Qwen3 with LD-MoLE."""
    base = get_mole_model(tiny_model("qwen3", num_layers=2), MoLEConfig(router="sparsegen", num_experts=2, r=2))
    for param in mole_parameters(base).values():  # lora_B starts at zero; make every weight distinct
        torch.nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(base)
    wrapped = SelectedLogits(base)
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(wrapped)
    return wrapped, base, reference


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of ``ids`` (SelectedLogits) ."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), positions=positions)


def main(folder: Path) -> None:
    """Runs every check; raises AssertionError on the first that fails."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = FSDP2Accelerator()
    wrapped, base, reference = sharded_model()
    assert is_sharded(accelerator)
    names = list(mole_parameters(base))
    assert all(isinstance(p, DTensor) for p in mole_parameters(base).values()), "the MoLE weights must be sharded"

    # 1. The gather hands the main process the full weights, the others nothing.
    gathered = gather_mole_state(accelerator, wrapped, base)
    if rank == 0:
        assert sorted(gathered) == sorted(names)
        for name, param in mole_parameters(reference).items():
            assert torch.equal(gathered[name], param.detach()), f"{name}: gathered weight is not the full weight"
    else:
        assert gathered is None

    # 2. One training step; the adapter saved from the gather reproduces the sharded model's logits.
    optimizer = torch.optim.AdamW(list(mole_parameters(base).values()), lr=1e-2)
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    logits(wrapped, ids).float().logsumexp(-1).mean().backward()
    optimizer.step()
    gathered = gather_mole_state(accelerator, wrapped, base)
    with torch.no_grad():
        expected = logits(wrapped, ids)
    if rank == 0:
        save_mole(base, folder / "adapter", state_dict=gathered)
    dist.barrier()
    load_mole(reference, folder / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(logits(SelectedLogits(reference), ids), expected)

    # 3. The optimiser state is gathered in full (for the main process) and loads back on every process.
    state = optimizer_state(accelerator, wrapped, optimizer)
    if rank == 0:
        moments = [entry["exp_avg"] for entry in state["state"].values()]
        assert len(moments) == len(names)
        assert {tuple(m.shape) for m in moments} == {tuple(p.shape) for p in mole_parameters(reference).values()}
        torch.save(state, folder / "optimizer.pt")
    else:
        assert state is None
    dist.barrier()
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.zero_grad(set_to_none=True)
    logits(wrapped, ids).float().logsumexp(-1).mean().backward()
    optimizer.step()  # moves the moments away from the saved ones
    load_optimizer_state(accelerator, wrapped, optimizer, saved)
    again = optimizer_state(accelerator, wrapped, optimizer)
    if rank == 0:
        for key, entry in saved["state"].items():
            assert torch.equal(again["state"][key]["exp_avg"], entry["exp_avg"]), f"{key}: optimiser state not restored"

    # 4. Full weights from the main process alone reach every process's slice (resume, best-epoch restore).
    load_mole_state(accelerator, wrapped, base, {n: torch.full_like(t, 0.5) for n, t in gathered.items()}
                    if rank == 0 else None)
    for name, param in mole_parameters(base).items():
        assert torch.all(param.to_local() == 0.5), f"rank {rank}: {name} was not loaded"
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
