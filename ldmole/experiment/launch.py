"""What the launcher decides for a run: the process count's per-device batch and the mixed precision.

``per_device_batch_size`` and ``mixed_precision`` may be left null in a run's config. The run then takes
them from how it was launched, once its ``Accelerator`` exists: the micro-batch that splits ``batch_size``
over the processes (at most 4 per process, the rest by gradient accumulation: ``run.sh``'s rule), and the
precision ``accelerate launch`` or its config file asked for (``no`` under plain ``python``). The values
taken are written into the config, so ``config.yaml`` records what the run used and a resume under another
launcher is refused as a different run.
"""

from __future__ import annotations

import dataclasses

from .precision import MIXED_PRECISIONS
from .run_config import OptimConfig, RunConfig

__all__ = ["MAX_DEFAULT_PER_DEVICE", "default_per_device_batch", "gradient_accumulation", "resolve_launch"]

MAX_DEFAULT_PER_DEVICE = 4  # the largest micro-batch a null per_device_batch_size becomes


def default_per_device_batch(batch_size: int, num_processes: int) -> int:
    """The largest micro-batch up to 4 that divides ``batch_size / num_processes`` (run.sh's rule).

    Raises:
        ValueError: ``batch_size`` does not split evenly over the processes (naming both and the fix).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if batch_size % num_processes:
        raise ValueError(f"batch_size={batch_size} cannot be split evenly over {num_processes} processes: set "
                         f"batch_size to a multiple of {num_processes} or launch a number of processes that divides it")
    share = batch_size // num_processes
    return next(size for size in range(min(share, MAX_DEFAULT_PER_DEVICE), 0, -1) if share % size == 0)


def gradient_accumulation(optim: OptimConfig, num_processes: int) -> int:
    """Micro-batches per optimiser step so that the global batch is ``batch_size`` (``per_device_batch_size``
    null: :func:`default_per_device_batch`).

    Raises:
        ValueError: ``batch_size`` is not a multiple of per-device batch x processes (naming the keys).
    """
    per_device = optim.per_device_batch_size or default_per_device_batch(optim.batch_size, num_processes)
    per_step = per_device * num_processes
    if optim.batch_size % per_step:
        raise ValueError(
            f"batch_size={optim.batch_size} is not a multiple of per_device_batch_size="
            f"{per_device} x {num_processes} processes; change either key (or leave per_device_batch_size "
            "unset: it then follows the process count)"
        )
    return optim.batch_size // per_step


def resolve_launch(config: RunConfig, num_processes: int, launcher_precision: str,
                   device_type: str = "cuda") -> RunConfig:
    """``config`` with a null ``per_device_batch_size`` and ``mixed_precision`` set from the launch: the
    default micro-batch for ``num_processes`` and ``launcher_precision`` (the ``Accelerator``'s). Keys the
    run sets stay as they are; the batch arithmetic is checked. Returns a new config (``config`` unchanged).

    Raises:
        ValueError: the batch does not split over the processes, the launcher's precision is one a run
            cannot name (e.g. fp8), or fp16 on a CPU (accelerate runs it in float32 without a word, so the
            recorded precision would be false).
    """
    optim = config.optim
    per_device = optim.per_device_batch_size or default_per_device_batch(optim.batch_size, num_processes)
    precision = optim.mixed_precision or launcher_precision
    if precision not in MIXED_PRECISIONS:
        raise ValueError(f"the launcher asks for mixed_precision={precision!r}, which a run cannot use; launch with "
                         f"one of {MIXED_PRECISIONS} or set mixed_precision=<one of them>")
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("mixed_precision=fp16 needs a GPU: on a CPU accelerate trains in float32 whatever it is "
                         "asked; set mixed_precision=no (or bf16) here")
    resolved = dataclasses.replace(config, optim=dataclasses.replace(optim, per_device_batch_size=per_device,
                                                                     mixed_precision=precision))
    gradient_accumulation(resolved.optim, num_processes)
    return resolved
