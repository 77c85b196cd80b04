"""What an adapter folder says about itself: ``adapter_info.json`` (base model, method, task, prompt
format, ldmole version) and a model card (``README.md``) with the run's metrics and routing."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from .data import TaskSpec
    from .run_config import RunConfig

__all__ = ["AdapterInfo", "INFO_NAME", "CARD_NAME", "model_card", "is_local_path", "is_hub_id"]

INFO_NAME = "adapter_info.json"
CARD_NAME = "README.md"
_NAMED_SOURCES = ("random:", "offline:")  # base models named by ldmole, rebuilt or converted on any machine


def is_local_path(source: str) -> bool:
    """Whether ``source`` names a place on this machine (an existing path, or one spelled as a path:
    absolute, ``./``, ``../``, ``~`` or with several ``/``) rather than a hub id or an ldmole name."""
    if source.startswith(_NAMED_SOURCES):
        return False
    path = Path(source).expanduser()
    return path.exists() or path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 \
        or "\\" in source


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is a hub repository id (``owner/name``, not an existing path)."""
    return source.count("/") == 1 and ":" not in source and not is_local_path(source)


@dataclass
class AdapterInfo:
    """Everything needed to rebuild the base model an adapter was trained on, and what it was trained for.

    ``base_model`` is what the run's ``model_source`` named (hub id, local directory,
    ``offline:smollm2_135m`` or ``random:<family>``; a random base is rebuilt from ``seed`` and
    ``random_init``), ``base_model_revision`` the hub commit it was loaded at when known.
    ``tokenizer`` is a hub id or None, never a local path: a run's local tokenizer (or a local base
    model's own) is saved into the adapter folder instead (``tokenizer_in_folder``).
    ``tokenizer_source`` is where ``save_adapter`` copies it from; it is not written to the file.
    (Folders written before 0.2.1 may record an absolute tokenizer path; they still load.)
    """

    base_model: str
    model_kind: str  # "causal_lm" or "classification"
    method: str
    task: str
    chat_format: str
    ldmole_version: str
    base_model_revision: Optional[str] = None
    model: Optional[str] = None  # the model config name (configs/models/<model>.yaml)
    num_labels: Optional[int] = None
    torch_dtype: str = "float32"
    tokenizer: Optional[str] = None
    tokenizer_in_folder: bool = False
    random_init: Optional[dict] = None
    seed: int = 42
    extra: dict = field(default_factory=dict)
    tokenizer_source: Optional[str] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_run(cls, config: "RunConfig", spec: "TaskSpec", base: Any = None) -> "AdapterInfo":
        """The info of a run's adapter from its config, its task and the loaded base model.

        A hub tokenizer id is recorded as it is; a local tokenizer directory, or the local base
        model's own tokenizer, is marked to be saved into the folder (``tokenizer_in_folder``).
        """
        from .. import __version__

        revision = getattr(getattr(base, "config", None), "_commit_hash", None)
        backbone = config.backbone
        source, tokenizer = str(backbone.model_source), backbone.tokenizer
        local = tokenizer if tokenizer and is_local_path(tokenizer) else None
        if tokenizer is None and is_local_path(source):
            local = source
        return cls(base_model=source, model_kind=spec.task_kind.model_kind,
                   method=config.method, task=config.task, chat_format=backbone.chat_format,
                   ldmole_version=__version__, base_model_revision=revision, model=config.model,
                   num_labels=spec.num_labels, torch_dtype=backbone.torch_dtype,
                   tokenizer=None if local else tokenizer, tokenizer_in_folder=local is not None,
                   tokenizer_source=str(Path(local).expanduser().resolve()) if local else None,
                   random_init=dict(backbone.random_init) or None, seed=config.seed)

    def to_dict(self) -> dict[str, Any]:
        """The fields written to ``adapter_info.json`` (all but ``tokenizer_source``)."""
        data = dataclasses.asdict(self)
        data.pop("tokenizer_source")
        return data

    def to_json(self) -> str:
        """The text of ``adapter_info.json``."""
        return json.dumps(self.to_dict(), indent=2)

    def write(self, directory: Union[str, Path]) -> Path:
        """Writes ``adapter_info.json`` into ``directory`` (atomically)."""
        from ..core.adapter_io import atomic_write

        path = Path(directory) / INFO_NAME
        atomic_write(path, lambda tmp: Path(tmp).write_text(self.to_json()))
        return path

    @classmethod
    def read(cls, directory: Union[str, Path]) -> "AdapterInfo":
        """The info of an adapter folder.

        Raises:
            FileNotFoundError: the folder has no adapter_info.json (it predates it; pass base_model=).
            ValueError: the file is not valid JSON (line and column named), not a JSON object, or
                misses required keys (listed).
        """
        path = Path(directory) / INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the adapter was saved without its base-model record "
                                    "(adapters written by ldmole before 0.2); pass base_model=... explicitly")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                             "fix the file or save the adapter again") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object with the keys "
                             f"{_required_keys()}; fix the file or save the adapter again")
        missing = [key for key in _required_keys() if key not in data]
        if missing:
            raise ValueError(f"{path}: missing required keys {missing}; add them (see AdapterInfo) "
                             "or save the adapter again")
        known = {f.name for f in dataclasses.fields(cls)} - {"tokenizer_source"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _required_keys() -> list[str]:
    """The keys adapter_info.json must hold (the fields of AdapterInfo without a default)."""
    return [f.name for f in dataclasses.fields(AdapterInfo)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    """Markdown table rows of the headline metrics present in ``metrics``."""
    rows = []
    for key, label in (("accuracy", "accuracy"), ("mcc", "Matthews corr."), ("f1", "F1")):
        if metrics.get(key) is not None:
            rows.append(f"| {label} | {100 * float(metrics[key]):.2f} |" if key == "accuracy"
                        else f"| {label} | {float(metrics[key]):.4f} |")
    if metrics.get("num_eval_examples") is not None:
        rows.append(f"| examples | {metrics['num_eval_examples']} ({metrics.get('eval_split', 'evaluation')} split) |")
    return rows


def _routing_lines(routing: dict[str, Any]) -> list[str]:
    """Markdown lines summarising the routing statistics of ``metrics.json``."""
    if not routing:
        return ["No router (plain LoRA)."]
    lines = [f"Mean active experts per token: {routing['avg_active_experts']:.2f} "
             f"(tokens with no active expert: {100 * routing.get('zero_activation_rate', 0.0):.1f}%).", "",
             "| layer | active experts |", "|---:|---:|"]
    lines += [f"| {layer} | {row['avg_active_experts']:.2f} |" for layer, row in routing.get("per_layer", {}).items()]
    lam = routing.get("lambda")
    if lam:
        q = lam.get("quantiles", {})
        lines += ["", f"λ over tokens: mean {lam['mean']:.3f}, q05 {q.get('q05')}, q50 {q.get('q50')}, q95 {q.get('q95')}."]
    return lines


def model_card(info: AdapterInfo, metrics: Optional[dict[str, Any]] = None) -> str:
    """The text of an adapter's ``README.md``: front matter for the hub, what it is, metrics, routing, usage."""
    metrics = metrics or {}
    hub_base = info.base_model if is_hub_id(info.base_model) else None
    front = ["---", "library_name: ldmole", *([f"base_model: {hub_base}"] if hub_base else []),
             "tags:", "- ldmole", "- mixture-of-lora-experts", f"- {info.method}", "---", ""]
    lines = [f"# {info.method} adapter: {info.base_model} on {info.task}", "",
             f"A mixture-of-LoRA-experts adapter trained with ldmole {info.ldmole_version} "
             f"(method `{info.method}`, task `{info.task}`, prompt format `{info.chat_format}`).", "",
             f"- base model: `{info.base_model}`" + (f" at revision `{info.base_model_revision}`"
                                                    if info.base_model_revision else ""),
             f"- head: {info.model_kind}" + (f" with {info.num_labels} labels" if info.model_kind == "classification" else ""),
             ""]
    rows = _metric_rows(metrics)
    if rows:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---:|", *rows, ""]
    if "routing" in metrics:
        lines += ["## Routing", "", *_routing_lines(metrics["routing"]), ""]
    lines += ["## Use", "", "```python", "import ldmole", "", 'model = ldmole.from_pretrained("<this folder or hub repo>")',
              "```", "", "`base_model=` points at another copy of the base model when needed.", ""]
    return "\n".join(front + lines)
