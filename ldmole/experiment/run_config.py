"""Run configuration: typed sections composed from YAML files and ``key=value`` overrides, validated once.

Keys stay flat on the command line, in the YAML files and in a run's ``config.yaml`` (``lr=1e-4``,
``mole.r=4``); in code they live in typed sections (``config.optim.lr``, ``config.mole.r``). Every
field has its default and help text here, the single source that ``ldmole.cli.train --help`` and
README's "Config keys" table (kept in step by a test) describe.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ..core.config import MoLEConfig
from ..core.losses import LB_PROBS, REMOLE_L1_FORMS
from ..core.suggest import did_you_mean
from .data.chat import CHAT_FORMATS
from .data.tasks import TASKS

__all__ = ["CONFIG_DIR", "RunConfig", "BackboneConfig", "DataConfig", "OptimConfig", "LossConfig", "LoggingConfig",
           "compose_config", "parse_overrides", "available", "describe_keys"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def setting(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A config field with its default, its help text and, for named values, the names it may take."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BackboneConfig:
    """The base model and how text becomes its tokens (model files set these)."""

    model_source: Optional[str] = setting(None, "hub id, local directory, offline:smollm2_135m or random:<family> "
                                                "(set by the model file)")
    tokenizer: Optional[str] = setting(None, "tokenizer directory or hub id; null = the model's own")
    chat_format: str = setting("plain", "how a prompt becomes tokens (README: the chat_format table)",
                               tuple(CHAT_FORMATS))
    torch_dtype: str = setting("float32", "dtype the base model's weights load in (float32, bfloat16, float16)")
    random_init: dict = setting({}, "shape of a random:<family> model (hidden_size, num_hidden_layers, ...)")


@dataclass
class DataConfig:
    """Where the task data comes from and how much of it a run uses."""

    data_dir: Optional[str] = setting(None, "local data root (DIR/<name>/<split>.jsonl); null = Hugging Face hub")
    max_length: Optional[int] = setting(None, "longest sequence; null = the task's (1024 QA, 512 GLUE); longer "
                                              "sequences are an error unless truncate_long=true")
    train_max_examples: Optional[int] = setting(None, "train on N examples (drawn with seed); null = all")
    eval_max_examples: Optional[int] = setting(None, "score at most the first N selection / evaluation examples")
    protocol: str = setting("selection", "selection: best epoch on a split carved from train, scored on validation; "
                                         "reference: select and report on validation", ("selection", "reference"))
    selection_size: Optional[int] = setting(None, "size of the selection carve; null = min(500, 10% of train) "
                                                  "(MMLU-Pro: its fixed 80/10/10 carve)")
    skip_bad_rows: bool = setting(False, "skip malformed data rows (counted in metrics.json) instead of failing")
    truncate_long: bool = setting(False, "left-truncate prompts longer than max_length instead of failing")


@dataclass
class OptimConfig:
    """Optimisation (docs/method.md §4): AdamW, batch arithmetic, lr schedule, precision."""

    num_epochs: int = setting(10, "training epochs")
    max_steps: Optional[int] = setting(None, "stop after this many optimiser steps (smoke runs); null = no cap")
    batch_size: int = setting(16, "global batch per optimiser step (all processes and accumulation together); the "
                                  "last step of an epoch may have fewer micro-batches, its gradient still their mean")
    per_device_batch_size: int = setting(4, "micro-batch per process; accumulation = batch_size / "
                                            "(per_device_batch_size x processes)")
    eval_batch_size: int = setting(16, "batch of selection and evaluation")
    lr: float = setting(1.0e-4, "AdamW learning rate")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip")
    lr_milestones: list = setting([6, 8], "epochs at which the lr is multiplied by lr_gamma (MultiStepLR)")
    lr_gamma: float = setting(0.1, "lr factor at each milestone")
    warmup_steps: int = setting(0, "linear lr warm-up steps")
    label_smoothing: float = setting(0.1, "label smoothing of the task cross-entropy (answer tokens only)")
    mixed_precision: str = setting("no", "accelerate autocast: no, bf16 or fp16 (run.sh uses bf16 on GPUs); the "
                                         "router stays float32", ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = setting(False, "non-reentrant activation checkpointing")


@dataclass
class LossConfig:
    """Routing loss terms added to the task loss (method files set them)."""

    lb_coef: float = setting(1.0, "load-balance loss coefficient; 0 = off")
    lb_probs: str = setting("weights", "P of the load balance for topk routing: weights (renormalised top-k) or "
                                       "softmax (full softmax, MoLA's); other routers use their weights", LB_PROBS)
    sparsity_coef: float = setting(0.0, "analytic sparsity loss coefficient; 0 = off")
    sparsity_k: int = setting(2, "target number of active experts of the sparsity loss")
    z_coef: float = setting(0.0, "router z-loss coefficient; 0 = off")
    remole_initial_coef: float = setting(1.0e-8, "ReMoLE L1 controller: initial coefficient (> 0)")
    remole_rate: float = setting(1.2, "ReMoLE L1 controller: coefficient factor per optimiser step (> 1)")
    remole_l1: str = setting("balanced", "ReMoLE's L1: balanced (ReMoE's load-balanced L1) or plain "
                                         "(mean over tokens of sum_e p_e)", REMOLE_L1_FORMS)


@dataclass
class LoggingConfig:
    """Logs, saved adapters, checkpoints and failure diagnosis."""

    log_every: int = setting(10, "optimiser steps per log.jsonl line")
    report_to: str = setting("none", "none, tensorboard or wandb (when installed): step losses, selection accuracy "
                                     "per epoch, final metrics and routing summary", ("none", "tensorboard", "wandb"))
    save_epoch_adapters: list = setting([1], "also keep the adapter after these epochs (adapter_epoch<N>/)")
    save_every: int = setting(0, "resumable checkpoint every N optimiser steps and at epoch ends; 0 = off")
    keep_checkpoints: int = setting(2, "newest checkpoints kept under output_dir/checkpoints/")
    resume: Optional[str] = setting(None, "auto = newest checkpoint of output_dir, or a checkpoints/step-N directory")
    debug_nonfinite: bool = setting(False, "check every step and name the first module whose output went "
                                           "NaN/inf (slow)")


SECTIONS = {"backbone": BackboneConfig, "data": DataConfig, "optim": OptimConfig, "losses": LossConfig,
            "logging": LoggingConfig}
# Keys that model / method files may set on top of the defaults.
FILE_KEYS = {
    "models": ("model_source", "chat_format", "torch_dtype", "random_init", "tokenizer", "num_epochs", "mole"),
    "methods": ("mole", *(f.name for f in dataclasses.fields(LossConfig))),
}


@dataclass
class RunConfig:
    """One run: which model, task and method, then the typed sections; ``mole`` is the ``MoLEConfig``."""

    model: str = setting("qwen3_1.7b", "a configs/models/ file (model_source, chat_format, torch_dtype, ...)")
    task: str = setting("arc_c", f"a registered task: {', '.join(TASKS)}", tuple(TASKS))
    method: str = setting("ldmole", "a configs/methods/ file (see Methods)")
    seed: int = setting(42, "data order, selection carve, initialisation")
    output_dir: Optional[str] = setting(None, "null = runs/<model>/<task>/<method>/seed<seed>")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mole: MoLEConfig = field(default_factory=MoLEConfig)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.model}/{self.task}/{self.method}/seed{self.seed}"

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "RunConfig":
        """A config from flat keys (``config.yaml``'s layout); missing keys take their defaults.

        Raises:
            ValueError: an unknown key (naming the closest), a value of the wrong type or not among
                the key's choices, or an invalid ``mole`` setting.
        """
        keys = flat_keys()
        values: dict[Optional[str], dict[str, Any]] = {None: {}, **{name: {} for name in SECTIONS}}
        for key, value in flat.items():
            if key == "mole":
                continue
            if key not in keys:
                raise ValueError(f"unknown key {key!r}{did_you_mean(key, sorted(keys))}; "
                                 "valid keys are listed in README.md (or ldmole.cli.train --help)")
            section, spec, hint = keys[key]
            values[section][key] = _check_value(key, value, hint, spec.metadata["choices"])
        try:
            mole = MoLEConfig(**(flat.get("mole") or {}))
        except (ValueError, TypeError) as error:
            raise ValueError(f"invalid mole settings for method={flat.get('method')!r}: {error}") from None
        config = cls(**values[None], mole=mole, **{name: SECTIONS[name](**values[name]) for name in SECTIONS})
        if not config.backbone.model_source:
            raise ValueError(f"model_source is not set: configs/models/{config.model}.yaml (or model_source=...) "
                             "must name the base model")
        return config

    def to_flat(self) -> dict[str, Any]:
        """Flat keys of every field, in declaration order, ``mole`` as a dict (what ``config.yaml`` holds)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SECTIONS and
                f.name != "mole"}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        flat["mole"] = self.mole.to_dict()
        return flat


def flat_keys() -> dict[str, tuple[Optional[str], dataclasses.Field, Any]]:
    """Every flat key -> (its section, or None for the top level; its field; its type)."""
    keys = {}
    for section, cls in [(None, RunConfig), *SECTIONS.items()]:
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            if spec.name not in SECTIONS and spec.name != "mole":
                keys[spec.name] = (section, spec, hints[spec.name])
    return keys


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping"}


def _check_value(key: str, value: Any, hint: Any, choices: Sequence[str]) -> Any:
    """``value`` as the field's type (ints as floats; a bare YAML no/yes as the string); errors name the key."""
    if typing.get_origin(hint) is Union:
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is str and isinstance(value, bool):
        value = "yes" if value else "no"  # YAML reads a bare no/yes as a bool
    if hint is float and not isinstance(value, bool):
        try:
            value = float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            pass
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{key}={value!r} must be {_TYPE_NAMES[hint]}")
    if choices and value not in choices:
        raise ValueError(f"{key}={value!r} is unknown{did_you_mean(value, choices)}; choose one of {tuple(choices)}")
    return value


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, help) of every key, ``mole.<field>`` keys last (what ``--help`` prints)."""
    rows = []
    for key, (_, spec, _) in flat_keys().items():
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        rows.append((key, default, spec.metadata["help"]))
    for spec in dataclasses.fields(MoLEConfig):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        rows.append((f"mole.{spec.name}", default, spec.metadata["help"]))
    return rows


def available(kind: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the YAML files in ``configs/<kind>/`` (models or methods)."""
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_steps=20", "mole.r=4"]`` -> ``{"max_steps": 20, "mole.r": 4}`` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {item!r} is not key=value (e.g. max_steps=20)")
        overrides[key.strip()] = yaml.safe_load(value) if value != "" else None
    return overrides


def _check_override_keys(overrides: dict[str, Any]) -> None:
    """Unknown keys fail before any file is read, naming the closest valid key."""
    allowed = set(flat_keys()) | {"mole"}
    mole_fields = sorted(f.name for f in dataclasses.fields(MoLEConfig))
    for key in overrides:
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            if sub not in mole_fields:
                raise ValueError(f"unknown key {key!r}{did_you_mean(sub, mole_fields)} (mole.* keys: {mole_fields})")
        elif key not in allowed:
            raise ValueError(f"unknown key {key!r}{did_you_mean(key, sorted(allowed))}; valid keys are listed in "
                             "README.md (or ldmole.cli.train --help)")


def _selected(selector: str, overrides: dict[str, Any], names: Sequence[str]) -> str:
    """The model / task / method a run selects (its default unless overridden), checked against ``names``."""
    name = str(overrides.get(selector, RunConfig.__dataclass_fields__[selector].default))
    if name not in names:
        raise ValueError(f"unknown {selector} {name!r}{did_you_mean(name, names)}; choose one of {list(names)}")
    return name


def compose_config(overrides: Sequence[str] | dict[str, Any] = (), config_dir: Path = CONFIG_DIR) -> RunConfig:
    """Defaults <- models/<model>.yaml <- methods/<method>.yaml <- overrides, as a validated ``RunConfig``.

    ``mole`` keys merge key by key across the layers; ``task`` must be a registered task.

    Raises:
        ValueError: an unknown key, model, task or method (naming it and the closest valid one),
            a bad value (naming the key), or an invalid MoLE setting.
    """
    overrides = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    _check_override_keys(overrides)
    flat: dict[str, Any] = {"task": _selected("task", overrides, list(TASKS)), "mole": {}}
    for selector, kind in (("model", "models"), ("method", "methods")):
        name = _selected(selector, overrides, available(kind, config_dir))
        layer = _read_yaml(config_dir / kind / f"{name}.yaml")
        for key in layer:
            if key not in FILE_KEYS[kind]:
                raise ValueError(f"{config_dir / kind / name}.yaml sets {key!r}, which a {kind[:-1]} file may not set")
        flat.update(layer, mole={**flat["mole"], **(layer.get("mole") or {})}, **{selector: name})
    for key, value in overrides.items():
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            flat["mole"][sub] = value
        elif top == "mole":
            flat["mole"].update(value or {})
        else:
            flat[key] = value
    return RunConfig.from_flat(flat)
