"""What makes two runs the same run: the config keys that change what a run computes, in one place.

Three uses read these lists:

- a checkpoint records the run's identity (every key except :data:`RESUME_MAY_CHANGE`) and a resume
  refuses a checkpoint whose identity differs, naming each key with both values;
- a run folder's ``config.yaml`` decides whether ``resume=auto`` may continue or restart that folder;
- ``ldmole-sweep`` counts a grid point as finished only when the ``config.yaml`` beside its
  ``metrics.json`` equals the point's resolved config on every key except :data:`BOOKKEEPING_KEYS`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

__all__ = ["BOOKKEEPING_KEYS", "RESUME_MAY_CHANGE", "flatten", "identity", "identity_hash", "differences",
           "describe_differences"]

# Keys that never change a number a run reports: where files go, how often the run logs and saves,
# how it starts. Two runs that differ only here computed the same thing.
BOOKKEEPING_KEYS = ("output_dir", "log_every", "report_to", "save_every", "keep_checkpoints", "save_epoch_adapters",
                    "resume", "overwrite", "debug_nonfinite")
# Keys a resume may change besides those: they move where the run stops, not what any step computes
# (the lr schedule depends on steps per epoch and the milestones, not on the number of epochs).
RESUME_MAY_CHANGE = (*BOOKKEEPING_KEYS, "max_steps", "num_epochs")


def flatten(flat_config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``RunConfig.to_flat()`` dict with its ``mole`` mapping spread into ``mole.<field>`` keys."""
    out = {key: value for key, value in flat_config.items() if key != "mole"}
    for key, value in (flat_config.get("mole") or {}).items():
        out[f"mole.{key}"] = value
    return out


def identity(flat_config: Mapping[str, Any], ignore: Iterable[str] = RESUME_MAY_CHANGE) -> dict[str, Any]:
    """The keys of a flat config (``RunConfig.to_flat()``) that change what the run computes, as plain data."""
    skipped = set(ignore)
    return json.loads(json.dumps({k: v for k, v in flatten(flat_config).items() if k not in skipped}))


def identity_hash(ident: Mapping[str, Any]) -> str:
    """A SHA-256 of an identity (key order does not matter)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every key on which two identities differ, sorted by key;
    a key one of them lacks reads as ``<absent>``."""
    absent = "<absent>"
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k, absent), current.get(k, absent)) for k in keys
            if saved.get(k, absent) != current.get(k, absent)]


def describe_differences(diffs: list[tuple[str, Any, Any]], saved_label: str = "saved",
                         current_label: str = "now") -> str:
    """``key: saved X, now Y; ...`` for an error message."""
    return "; ".join(f"{key}: {saved_label} {json.dumps(a)}, {current_label} {json.dumps(b)}" for key, a, b in diffs)
