"""Raw dataset rows from a local copy (JSONL, JSON or Parquet) or from the Hugging Face hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .tasks import TaskSpec

__all__ = ["SourceRow", "load_split_rows", "LOCAL_SUFFIXES"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class SourceRow(dict):
    """A raw row (a plain dict of the dataset's fields) that also remembers where it came from.

    ``number`` is 1-based: the line of a JSONL file, the item of a JSON list, the row of a Parquet
    file or hub split. ``origin`` is the human-readable location used in error messages.
    """

    def __init__(self, fields: dict[str, Any], source: str, unit: str, number: int) -> None:
        super().__init__(fields)
        self.source = source
        self.unit = unit
        self.number = number

    @property
    def origin(self) -> str:
        """Where the row came from, e.g. '/data/arc_challenge/train.jsonl line 17'."""
        return f"{self.source} {self.unit} {self.number}"


def load_split_rows(spec: "TaskSpec", split: str, data_dir: Union[str, Path, None] = None) -> list[SourceRow]:
    """All rows of one split: from ``data_dir/<local_dir>/<split>.{jsonl,json,parquet}``, or from
    the hub (``datasets.load_dataset(hub_path, hub_config, split=split)``) when ``data_dir`` is None.

    Raises:
        ValueError: ``data_dir`` is None for a task with no ``hub_path`` (local data only).
    """
    if data_dir is None and spec.hub_path is None:
        raise ValueError(f"task {spec.name!r} has no hub_path (its data is local only); pass data_dir= pointing at "
                         f"a folder holding {spec.local_dir}/{split}.jsonl")
    if data_dir is None:
        return _hub_rows(spec, split)
    return _local_rows(spec, split, Path(data_dir))


def _local_rows(spec: "TaskSpec", split: str, data_dir: Path) -> list[SourceRow]:
    """Rows of the first local file found for ``split``, with an actionable error when none is."""
    folder = data_dir / spec.local_dir
    fix = f"put {split}.jsonl there or drop data_dir= to load from the hub"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task {spec.name!r}: data directory {folder} does not exist (needed for split {split!r}); {fix}"
        )
    for suffix in LOCAL_SUFFIXES:
        path = folder / f"{split}{suffix}"
        if path.is_file():
            rows = _read_parquet(path) if suffix == ".parquet" else _read_json(path)
            if not rows:
                raise ValueError(f"task {spec.name!r}: split {split!r} is empty: {path} has no rows; "
                                 "fill it or point data_dir at the directory that holds the task's data")
            return rows
    raise FileNotFoundError(
        f"task {spec.name!r}: no file for split {split!r}: tried {folder / (split + '.jsonl')} "
        f"(also .json, .parquet); {fix}"
    )


def _read_json(path: Path) -> list[SourceRow]:
    """Rows of a JSON-lines file, or of a file holding one JSON list of objects."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON list ({exc.msg} at line {exc.lineno})") from exc
        return [_as_row(item, str(path), "item", number) for number, item in enumerate(items, start=1)]
    rows = []
    # split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: invalid JSON ({exc.msg})") from exc
        rows.append(_as_row(item, str(path), "line", number))
    return rows


def _read_parquet(path: Path) -> list[SourceRow]:
    """Rows of a Parquet file (pyarrow ships with ``datasets``)."""
    import pyarrow.parquet as pq

    items = pq.read_table(path).to_pylist()
    return [_as_row(item, str(path), "row", number) for number, item in enumerate(items, start=1)]


def _as_row(item: Any, source: str, unit: str, number: int) -> SourceRow:
    """Wrap one decoded item, rejecting anything that is not a JSON object."""
    if not isinstance(item, dict):
        raise ValueError(f"{source} {unit} {number}: expected a JSON object, got {type(item).__name__}")
    return SourceRow(item, source, unit, number)


def _hub_rows(spec: "TaskSpec", split: str) -> list[SourceRow]:
    """Rows of one hub split; any failure becomes an error that points at ``data_dir=``."""
    name = spec.hub_path if spec.hub_config is None else f"{spec.hub_path} ({spec.hub_config})"
    try:
        dataset = _load_hub_split(spec, split)
    except Exception as exc:
        raise ConnectionError(
            f"task {spec.name!r}: could not load split {split!r} of {name} from the Hugging Face hub "
            f"(hub unreachable or split missing: {type(exc).__name__}: {exc}); pass data_dir= pointing "
            f"at a folder holding {spec.local_dir}/{split}.jsonl"
        ) from exc
    source = f"{name} split {split}"
    return [SourceRow(item, source, "row", number) for number, item in enumerate(dataset.to_list(), start=1)]



SCRIPT_REFUSAL = "Dataset scripts are no longer supported"
PARQUET_REVISION = "refs/convert/parquet"


def _load_hub_split(spec: "TaskSpec", split: str):
    """``datasets.load_dataset`` of one split. datasets 4+ refuses repositories that still carry a
    loading script (SWAG's does); those fall back to the hub's automatic Parquet conversion."""
    import datasets

    try:
        return datasets.load_dataset(spec.hub_path, spec.hub_config, split=split)
    except Exception as exc:
        if SCRIPT_REFUSAL not in str(exc):
            raise
        return datasets.load_dataset(spec.hub_path, spec.hub_config, split=split, revision=PARQUET_REVISION)
