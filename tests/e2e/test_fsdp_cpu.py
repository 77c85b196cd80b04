"""Saving under real FSDP2 on two CPU processes (``python -m tests.fsdp_cpu_worker``): the gathered,
saved and loaded weights are the full ones (the in-process checks are in tests/unit/test_sharding.py)."""

from __future__ import annotations


import pytest

from ldmole.core.adapter_io import WEIGHTS_NAME
from tests.helpers import run_command


@pytest.mark.slow
def test_two_cpu_processes_under_real_fsdp2_gather_save_and_load_the_full_weights(tmp_path):
    """tests/fsdp_cpu_worker.py on two gloo processes with torch's ``fully_shard``: the gathered and saved
    adapter reproduce the sharded model, the optimiser state round-trips, and loading reaches every slice."""
    result = run_command("torch.distributed.run", ["--nproc_per_node", "2", "-m", "tests.fsdp_cpu_worker",
                                                   str(tmp_path)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
