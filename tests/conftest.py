"""Shared test fixtures (helpers that are plain functions live in tests/helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["qwen3", "llama"])
def family(request):
    return request.param


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored afterwards: tiny shapes gain nothing from intra-op threads,
    and on a loaded 2-core machine OpenMP threads waiting for a busy core make each tiny op take milliseconds.
    A benchmark test file uses it for all its tests with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
