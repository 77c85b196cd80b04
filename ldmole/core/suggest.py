"""Suggesting the closest valid name in error messages."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """' (did you mean 'X'?)' for the valid name closest to ``value``, or '' when none is close."""
    match = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
