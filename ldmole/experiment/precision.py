"""Mixed precision: the ``mixed_precision`` choices a run may name and the autocast each one means."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, Union

import torch

__all__ = ["MIXED_PRECISIONS", "AUTOCAST_DTYPES", "autocast_for"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISIONS = ("no", *AUTOCAST_DTYPES)  # accelerate's settings that mixed_precision may name


def autocast_for(mixed_precision: str, device: Union[str, torch.device]) -> Callable:
    """The autocast context factory of a run's ``mixed_precision`` (no, bf16, fp16) on ``device``,
    what accelerate's ``autocast`` gives the trainer, so that a rerun computes in the same precision."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r} is unknown; choose one of {MIXED_PRECISIONS}")
    if mixed_precision == "no":
        return nullcontext
    return partial(torch.autocast, device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[mixed_precision])
