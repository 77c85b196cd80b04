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

__all__ = ["AdapterInfo", "INFO_NAME", "CARD_NAME", "model_card"]

INFO_NAME = "adapter_info.json"
CARD_NAME = "README.md"


@dataclass
class AdapterInfo:
    """Everything needed to rebuild the base model an adapter was trained on, and what it was trained for.

    ``base_model`` is what the run's ``model_source`` named (hub id, local directory,
    ``offline:smollm2_135m`` or ``random:<family>``; a random base is rebuilt from ``seed`` and
    ``random_init``), ``base_model_revision`` the hub commit it was loaded at when known.
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
    random_init: Optional[dict] = None
    seed: int = 42
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_run(cls, config: "RunConfig", spec: "TaskSpec", base: Any = None) -> "AdapterInfo":
        """The info of a run's adapter from its config, its task and the loaded base model."""
        from .. import __version__

        revision = getattr(getattr(base, "config", None), "_commit_hash", None)
        backbone = config.backbone
        return cls(base_model=str(backbone.model_source), model_kind="causal_lm" if spec.kind == "qa" else "classification",
                   method=config.method, task=config.task, chat_format=backbone.chat_format,
                   ldmole_version=__version__, base_model_revision=revision, model=config.model,
                   num_labels=spec.num_labels, torch_dtype=backbone.torch_dtype, tokenizer=backbone.tokenizer,
                   random_init=dict(backbone.random_init) or None, seed=config.seed)

    def write(self, directory: Union[str, Path]) -> Path:
        """Writes ``adapter_info.json`` into ``directory`` (atomically)."""
        from ..core.adapter_io import atomic_write

        path = Path(directory) / INFO_NAME
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(self), indent=2)))
        return path

    @classmethod
    def read(cls, directory: Union[str, Path]) -> "AdapterInfo":
        """The info of an adapter folder; a clear error when the folder predates it."""
        path = Path(directory) / INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the adapter was saved without its base-model record "
                                    "(adapters written by ldmole before 0.2); pass base_model=... explicitly")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
    hub_base = info.base_model if "/" in info.base_model and ":" not in info.base_model else None
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
