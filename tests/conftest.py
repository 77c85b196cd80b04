"""Shared test fixtures (helpers that are plain functions live in tests/helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["qwen3", "llama"])
def family(request):
    return request.param
