"""``metrics.json``: the one schema the trainer writes and the results tables read."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["RunMetrics", "METRICS_NAME"]

METRICS_NAME = "metrics.json"
# Task metrics that only some tasks have; left out of the file when absent.
TASK_SPECIFIC = ("mcc", "f1", "per_category")


@dataclass
class RunMetrics:
    """What a finished run reports (docs/runs.md, "Outputs"). Identity and accuracy are required; files
    written by older versions may lack the rest, which then reads as None."""

    model: str
    task: str
    method: str
    seed: int
    accuracy: float  # a fraction of the evaluation split, at the best epoch
    num_eval_examples: Optional[int] = None
    prediction_counts: Optional[dict[str, int]] = None  # class / option index -> times predicted
    label_counts: Optional[dict[str, int]] = None       # class / option index -> times gold
    mcc: Optional[float] = None                          # CoLA
    f1: Optional[float] = None                           # MRPC
    per_category: Optional[dict[str, dict]] = None       # MMLU-Pro
    num_train_examples: Optional[int] = None
    eval_split: Optional[str] = None
    protocol: Optional[str] = None
    best_epoch: Optional[int] = None
    best_selection_accuracy: Optional[float] = None
    history: list[dict] = field(default_factory=list)   # per epoch: epoch, step, selection_accuracy
    steps: Optional[int] = None
    skipped_rows: Optional[dict[str, int]] = None
    routing: dict[str, Any] = field(default_factory=dict)  # RoutingStats.summary()
    resumed_from: Optional[str] = None
    wall_time_s: Optional[float] = None
    num_processes: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        """Every field, task-specific metrics only when present."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if not (k in TASK_SPECIFIC and v is None)}

    def to_json(self) -> str:
        """The text of ``metrics.json``."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, source: Union[str, Path] = "metrics.json") -> "RunMetrics":
        """Parses ``metrics.json`` text; ``source`` names the file in errors.

        Raises:
            ValueError: a required key is missing or a key is unknown.
        """
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}; is it a metrics.json written by ldmole?")
        for spec in dataclasses.fields(cls):
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            if required and spec.name not in data:
                raise ValueError(f"{source} has no {spec.name!r}; is it a metrics.json written by ldmole's trainer?")
        return cls(**data)

    @classmethod
    def read(cls, path: Union[str, Path]) -> "RunMetrics":
        """The metrics of the file at ``path``."""
        return cls.from_json(Path(path).read_text(), source=path)
