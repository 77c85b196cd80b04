"""Run configuration: typed sections composed from YAML files and ``key=value`` overrides, validated once.

Keys stay flat on the command line, in the YAML files and in a run's ``config.yaml`` (``lr=1e-4``,
``mole.r=4``); in code they live in typed sections (``config.optim.lr``, ``config.mole.r``). Every
field has its default, help text and allowed values here, the single source that ``ldmole-train --help``
and the key table of docs/config.md (kept in step by a test) describe. Each section checks its own
fields when it is built (``__post_init__``), so a section made in code is checked as one read from YAML.

``imports`` names modules (importable names or ``.py`` files) that composing a config imports before
anything else is resolved, so that routers and tasks they register can be named by the rest of the config.
Reading a config back (``RunConfig.from_flat`` of a ``config.yaml``) never imports what the file names, so a
crafted file cannot run code; the modules named in ``LDMOLE_IMPORTS`` (the user's own choice) are imported.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import typing
from types import ModuleType
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ..core.config import MoLEConfig
from ..core.losses import LB_PROBS, REMOLE_L1_FORMS
from ..core.routers import router_names, validate_mole_config
from ..core.suggest import did_you_mean
from .data.chat import CHAT_FORMATS
from .data.splits import PROTOCOLS
from .data.tasks import TASKS
from .precision import MIXED_PRECISIONS
from .replication import REPLICATE_CHOICES, REPLICATIONS, check_replication, replication_keys
from .run_identity import flatten

__all__ = ["CONFIG_DIR", "TORCH_DTYPES", "REPORT_TO", "PATH_KEYS", "IMPORTS_ENV", "RunConfig",
           "BackboneConfig", "DataConfig", "OptimConfig", "LossConfig", "LoggingConfig", "compose_config",
           "parse_overrides", "available", "describe_keys", "key_table_markdown", "allowed_range", "format_value",
           "import_modules", "import_env_modules"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
TORCH_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes torch_dtype may name (torch.<name>)
REPORT_TO = ("none", "tensorboard", "wandb")  # the trackers report_to may name
IMPORTS_ENV = "LDMOLE_IMPORTS"  # modules (os.pathsep-separated) imported whenever a config is built or read back


def setting(default: Any, help: str, choices: Sequence[str] = (), *, minimum: Optional[float] = None,
            maximum: Optional[float] = None, exclusive_minimum: bool = False, exclusive_maximum: bool = False,
            item_type: Optional[type] = None, path: bool = False) -> Any:
    """A config field with its default, help text and allowed values, all kept in the field's metadata.

    ``choices``: the names a string may take. ``minimum`` / ``maximum``: the range of a number (of each
    element of a list), exclusive where ``exclusive_minimum`` / ``exclusive_maximum``. ``item_type``: the
    type of a list's elements. ``path``: a file or folder, taken as written on the command line (no YAML),
    a leading ``~`` expanded (``PATH_KEYS``).
    """
    metadata = {"help": help, "choices": tuple(choices), "minimum": minimum, "maximum": maximum,
                "exclusive_minimum": exclusive_minimum, "exclusive_maximum": exclusive_maximum,
                "item_type": item_type, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class CheckedSection:
    """A config section whose fields are checked (type, choices, range) when it is built, in code or from keys."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class BackboneConfig(CheckedSection):
    """The base model and how text becomes its tokens (model files set these)."""

    model_source: Optional[str] = setting(None, "hub id, local directory, offline:smollm2_135m or random:<family> "
                                                "(set by the model file)", path=True)
    tokenizer: Optional[str] = setting(None, "tokenizer directory or hub id; null = the model's own", path=True)
    chat_format: str = setting("plain", "how a prompt becomes tokens (docs/prompts.md: the chat_format table)",
                               tuple(CHAT_FORMATS))
    torch_dtype: str = setting("float32", f"dtype the base model's weights load in ({', '.join(TORCH_DTYPES)})",
                               TORCH_DTYPES)
    random_init: dict = setting({}, "shape of a random:<family> model (hidden_size, num_hidden_layers, ...)")
    quantization: str = setting("none", "load the base's linear layers in 4-bit (nf4, fp4) or 8-bit (int8) through "
                                        "bitsandbytes, computing in torch_dtype (QLoRA; pip install -e '.[qlora]'; "
                                        "docs/quantization.md); none = unquantised", ("none", "nf4", "fp4", "int8"))


@dataclass
class DataConfig(CheckedSection):
    """Where the task data comes from and how much of it a run uses."""

    data_dir: Optional[str] = setting(None, "local data root (DIR/<name>/<split>.jsonl); null = Hugging Face hub",
                                      path=True)
    max_length: Optional[int] = setting(None, "longest sequence; null = the task's (1024 QA, 512 GLUE); longer "
                                              "sequences are an error unless truncate_long=true", minimum=1)
    train_max_examples: Optional[int] = setting(None, "train on N examples (drawn with seed); null = all", minimum=1)
    eval_max_examples: Optional[int] = setting(None, "score at most the first N selection / evaluation examples; "
                                                     "null = all", minimum=1)
    protocol: str = setting("selection", "selection: best epoch on a split carved from train, scored on validation; "
                                         "reference: select and report on validation", PROTOCOLS)
    selection_size: Optional[int] = setting(None, "size of the selection carve; null = min(500, 10% of train) "
                                                  "(MMLU-Pro: its fixed 80/10/10 carve)", minimum=1)
    skip_bad_rows: bool = setting(False, "skip malformed data rows (counted in metrics.json) instead of failing")
    truncate_long: bool = setting(False, "left-truncate prompts longer than max_length instead of failing")


@dataclass
class OptimConfig(CheckedSection):
    """Optimisation (docs/method.md §4): AdamW, batch arithmetic, lr schedule, precision."""

    num_epochs: int = setting(10, "training epochs", minimum=1)
    max_steps: Optional[int] = setting(None, "stop after this many optimiser steps (smoke runs); null = no cap",
                                       minimum=1)
    batch_size: int = setting(16, "global batch per optimiser step (all processes and accumulation together); the "
                                  "last step of an epoch may have fewer micro-batches, its gradient still their mean",
                              minimum=1)
    per_device_batch_size: Optional[int] = setting(None, "micro-batch per process; accumulation = batch_size / "
                                                         "(per_device_batch_size x processes); null = the largest "
                                                         "divisor of batch_size / processes up to 4 (run.sh's rule), "
                                                         "recorded in config.yaml", minimum=1)
    eval_batch_size: int = setting(16, "batch of selection and evaluation", minimum=1)
    lr: float = setting(1.0e-4, "AdamW learning rate", minimum=0, exclusive_minimum=True)
    weight_decay: float = setting(0.1, "AdamW weight decay", minimum=0)
    grad_clip: float = setting(1.0, "gradient norm clip", minimum=0, exclusive_minimum=True)
    lr_milestones: list = setting([6, 8], "epochs at which the lr is multiplied by lr_gamma (MultiStepLR)",
                                  item_type=int, minimum=1)
    lr_gamma: float = setting(0.1, "lr factor at each milestone", minimum=0, exclusive_minimum=True)
    warmup_steps: int = setting(0, "linear lr warm-up steps", minimum=0)
    label_smoothing: float = setting(0.1, "label smoothing of the task cross-entropy (answer tokens only)",
                                     minimum=0, maximum=1, exclusive_maximum=True)
    mixed_precision: Optional[str] = setting(None, "accelerate autocast: no, bf16 or fp16 (run.sh uses bf16 on "
                                                   "GPUs); the router stays float32; null = the launcher's (accelerate "
                                                   "launch --mixed_precision or its config file; no under plain python), "
                                                   "recorded in config.yaml", MIXED_PRECISIONS)
    gradient_checkpointing: bool = setting(False, "non-reentrant activation checkpointing")
    compile: bool = setting(False, "torch.compile every decoder layer (one graph for all; the same numbers to float "
                                   "round-off, dropout masks included; docs/speed.md)")


@dataclass
class LossConfig(CheckedSection):
    """Routing loss terms added to the task loss (method files set them)."""

    lb_coef: float = setting(1.0, "load-balance loss coefficient; 0 = off", minimum=0)
    lb_probs: str = setting("weights", "P of the load balance for topk routing: weights (renormalised top-k) or "
                                       "softmax (full softmax, MoLA's); other routers use their weights", LB_PROBS)
    sparsity_coef: float = setting(0.0, "analytic sparsity loss coefficient; 0 = off", minimum=0)
    sparsity_k: int = setting(2, "target number of active experts of the sparsity loss", minimum=1)
    z_coef: float = setting(0.0, "router z-loss coefficient; 0 = off", minimum=0)
    remole_initial_coef: float = setting(1.0e-8, "ReMoLE L1 controller: initial coefficient", minimum=0,
                                         exclusive_minimum=True)
    remole_rate: float = setting(1.2, "ReMoLE L1 controller: coefficient factor per optimiser step", minimum=1,
                                 exclusive_minimum=True)
    remole_l1: str = setting("balanced", "ReMoLE's L1: balanced (ReMoE's load-balanced L1) or plain "
                                         "(mean over tokens of sum_e p_e)", REMOLE_L1_FORMS)


@dataclass
class LoggingConfig(CheckedSection):
    """Logs, saved adapters, checkpoints and failure diagnosis."""

    log_every: int = setting(10, "optimiser steps per log.jsonl line", minimum=1)
    report_to: str = setting("none", "none, tensorboard or wandb (when installed): step losses, selection accuracy "
                                     "per epoch, final metrics and routing summary", REPORT_TO)
    save_epoch_adapters: list = setting([1], "also keep the adapter after these epochs (adapter_epoch<N>/)",
                                        item_type=int, minimum=1)
    save_every: int = setting(0, "resumable checkpoint every N optimiser steps and at epoch ends; 0 = off",
                              minimum=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept under output_dir/checkpoints/", minimum=1)
    resume: Optional[str] = setting(None, "auto = newest checkpoint of output_dir, or a checkpoints/step-N directory",
                                    path=True)
    overwrite: bool = setting(False, "start again in an output_dir that holds another run: its files are removed "
                                     "first (never with resume)")
    debug_nonfinite: bool = setting(False, "check every step and name the first module whose output went "
                                           "NaN/inf (slow)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overwrite and self.resume is not None:
            raise ValueError(f"overwrite=true and resume={self.resume!r} exclude each other (overwrite removes the "
                             "run that resume would continue): drop one of them")


SECTIONS = {"backbone": BackboneConfig, "data": DataConfig, "optim": OptimConfig, "losses": LossConfig,
            "logging": LoggingConfig}
# Keys that model / method files may set on top of the defaults.
FILE_KEYS = {
    "models": ("model_source", "chat_format", "torch_dtype", "random_init", "tokenizer", "num_epochs", "mole",
               "imports", "quantization"),
    "methods": ("mole", "imports", *(f.name for f in dataclasses.fields(LossConfig))),
}


@dataclass
class RunConfig(CheckedSection):
    """One run: which model, task and method, then the typed sections; ``mole`` is the ``MoLEConfig``."""

    model: str = setting("qwen3_1.7b", "a configs/models/ file (model_source, chat_format, torch_dtype, ...)")
    task: str = setting("arc_c", f"a registered task: {', '.join(TASKS)}, or one an imports module registers")
    method: str = setting("ldmole", "a configs/methods/ file (README: the methods table)")
    seed: int = setting(42, "data order, selection carve, initialisation", minimum=0, maximum=2**32 - 1)
    replicate: str = setting("none", "reference: the reference release's exact setting in one switch (protocol, "
                                     "prompt layout, router input, precision; README: Replicating the reference "
                                     "release); keys it sets cannot be given besides it", REPLICATE_CHOICES)
    output_dir: Optional[str] = setting(None, "null = runs/<model>/<task>/<method>/seed<seed>", path=True)
    imports: list = setting([], "modules imported before the config is composed, so that the routers and tasks they "
                                "register can be named: importable names or .py files (relative: from the current "
                                "folder, else the repository root); model file, method file and command line add up; "
                                "a saved config.yaml only records them (reading it back imports LDMOLE_IMPORTS)",
                            item_type=str)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mole: MoLEConfig = field(default_factory=MoLEConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}{did_you_mean(self.task, list(TASKS))}; choose one of "
                             f"{list(TASKS)} (a task registered by your own module needs imports=its_file.py)")
        if self.output_dir is None:
            self.output_dir = f"runs/{self.model}/{self.task}/{self.method}/seed{self.seed}"
        check_replication(self.replicate, flatten(self.to_flat()))

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "RunConfig":
        """A config from flat keys (``config.yaml``'s layout); missing keys take their defaults.

        ``imports`` is only checked, never imported: a ``config.yaml`` read back must not run the code it
        names (:func:`compose_config` imports it). The modules of ``LDMOLE_IMPORTS`` are imported first, so
        a run composed with ``imports`` reads back with them set there.

        Raises:
            ValueError: an unknown key (naming the closest), a value of the wrong type, not among the key's
                choices or out of its range, or an invalid ``mole`` setting; a router or task the recorded
                ``imports`` registered and nothing imported now says how to import them.
        """
        import_env_modules()
        try:
            return cls._from_flat(flat)
        except ValueError as error:
            router = (flat.get("mole") or {}).get("router", MoLEConfig.router)
            unregistered = router not in router_names() or flat.get("task", cls.task) not in TASKS
            if flat.get("imports") and unregistered:
                raise ValueError(f"{error}{_imports_hint(flat['imports'])}") from None
            raise

    @classmethod
    def _from_flat(cls, flat: dict[str, Any]) -> "RunConfig":
        """:meth:`from_flat` without the environment's imports (``compose_config`` imports its own first)."""
        keys = flat_keys()
        values: dict[Optional[str], dict[str, Any]] = {None: {}, **{name: {} for name in SECTIONS}}
        for key, value in flat.items():
            if key == "mole":
                continue
            if key not in keys:
                raise ValueError(f"unknown key {key!r}{did_you_mean(key, sorted(keys))}; "
                                 "valid keys are listed in docs/config.md (or ldmole-train --help)")
            section, _, _ = keys[key]
            values[section][key] = value
        try:
            mole = MoLEConfig(**(flat.get("mole") or {}))
            validate_mole_config(mole)  # the router's own checks, now rather than when the model is built
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


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, type) of each plain field of a config class (not the nested sections)."""
    hints = typing.get_type_hints(cls)
    return tuple((spec, hints[spec.name]) for spec in dataclasses.fields(cls)
                 if spec.name not in SECTIONS and spec.name != "mole")


def _check_fields(section: Any) -> None:
    """Checks every plain field of ``section`` against its type, choices and range (errors name the key),
    and stores the value as its type (an int as a float where a float is declared, a bare YAML no/yes as the
    string, a single string as a one-item list)."""
    for spec, hint in _field_hints(type(section)):
        value = getattr(section, spec.name)
        if hint is list and isinstance(value, str):
            value = [value]  # imports=my_routers.py means [my_routers.py]
        setattr(section, spec.name, _check_value(spec.name, value, hint, spec.metadata))


def flat_keys() -> dict[str, tuple[Optional[str], dataclasses.Field, Any]]:
    """Every flat key -> (its section, or None for the top level; its field; its type)."""
    return {spec.name: (section, spec, hint) for section, cls in [(None, RunConfig), *SECTIONS.items()]
            for spec, hint in _field_hints(cls)}


# Keys naming a file or folder: taken as written after ``key=`` (no YAML), a leading ``~`` expanded.
PATH_KEYS = frozenset(key for key, (_, spec, _) in flat_keys().items() if spec.metadata["path"])

_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a mapping"}


def allowed_range(metadata: Mapping[str, Any]) -> str:
    """A field's range as text (``>= 1``, ``> 0``, ``in [0, 1)``; a list's ``ints >= 1``); empty when it has none."""
    low, high = metadata["minimum"], metadata["maximum"]
    if low is not None and high is not None:
        opening, closing = "(" if metadata["exclusive_minimum"] else "[", ")" if metadata["exclusive_maximum"] else "]"
        text = f"in {opening}{low}, {high}{closing}"
    elif low is not None:
        text = f"{'>' if metadata['exclusive_minimum'] else '>='} {low}"
    elif high is not None:
        text = f"{'<' if metadata['exclusive_maximum'] else '<='} {high}"
    else:
        return ""
    return f"{metadata['item_type'].__name__}s {text}" if metadata["item_type"] else text


def _in_range(value: Any, metadata: Mapping[str, Any]) -> bool:
    """Whether a number lies in the field's range (NaN never does)."""
    low, high = metadata["minimum"], metadata["maximum"]
    above = low is None or (value > low if metadata["exclusive_minimum"] else value >= low)
    below = high is None or (value < high if metadata["exclusive_maximum"] else value <= high)
    return above and below


def _null_meaning(metadata: Mapping[str, Any]) -> str:
    """What null means for an optional field, from its help text (``null = no cap``), as ``" (or null = ...)"``."""
    match = re.search(r"null = ([^;]+)", metadata["help"])
    return f" (or null = {match.group(1).strip()})" if match else " (or null)"


def _check_items(key: str, value: list, metadata: Mapping[str, Any]) -> None:
    """Each element of a list field has the field's item type and lies in its range; errors name the key."""
    item_type = metadata["item_type"]
    for item in value:
        wrong_type = not isinstance(item, item_type) or (item_type is int and isinstance(item, bool))
        if wrong_type or not _in_range(item, metadata):
            example = "[1, 2]" if item_type in (int, float) else "[a, b]"
            raise ValueError(f"{key}={value!r} must be a list of {allowed_range(metadata) or item_type.__name__}; "
                             f"{item!r} is not (e.g. {key}={example})")


def _check_value(key: str, value: Any, hint: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` as the field's type (ints as floats; a bare YAML no/yes as the string), among its choices and in
    its range; errors name the key and what it may be."""
    optional = typing.get_origin(hint) is Union
    if optional:
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
    choices = metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"{key}={value!r} is unknown{did_you_mean(value, choices)}; choose one of {tuple(choices)}")
    if hint is float and math.isinf(value):
        raise ValueError(f"{key}={value!r} must be a finite number")
    if hint is list and metadata["item_type"]:
        _check_items(key, value, metadata)
    elif hint in (int, float) and not _in_range(value, metadata):
        null = _null_meaning(metadata) if optional else ""
        raise ValueError(f"{key}={value!r} must be {allowed_range(metadata)}{null}")
    return value


def _describe(spec: dataclasses.Field, hint: Any) -> str:
    """A field's help text, its range appended (``...; must be >= 1 or null``) where it has one."""
    text = allowed_range(spec.metadata)
    if not text:
        return spec.metadata["help"]
    return f"{spec.metadata['help']}; must be {text}{' or null' if typing.get_origin(hint) is Union else ''}"


def format_value(value: Any) -> str:
    """A value as it is written on the command line and in the YAML files: null, true/false, text as is,
    a float in its shortest exact form (``1e-4``, ``-2.5``, ``0.0``), lists and mappings as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, _, exponent = f"{value:e}".partition("e")
        digits = len(mantissa.replace("-", "").replace(".", "").rstrip("0"))
        short = f"{float(mantissa):.{max(digits - 1, 0)}f}e{int(exponent)}" if value else text
        return short if len(short) < len(text) and float(short) == value else text
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, help with the range) of every key, ``mole.<field>`` keys last (what ``--help`` prints)."""
    rows = []
    for key, (_, spec, hint) in flat_keys().items():
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        rows.append((key, default, _describe(spec, hint)))
    for spec in dataclasses.fields(MoLEConfig):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        rows.append((f"mole.{spec.name}", default, spec.metadata["help"]))
    return rows


def _markdown_cell(text: str) -> str:
    """Text for a Markdown table cell: ``|`` and ``<`` escaped (GitHub drops what looks like an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "\\<")


def key_table_markdown() -> str:
    """docs/config.md's key table, one row per key of :func:`describe_keys`: the key, its default as
    :func:`format_value` writes it and the help text with its range (what ``ldmole-train --help`` prints)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in describe_keys():
        lines.append(f"| `{key}` | `{format_value(default)}` | {_markdown_cell(help_text)} |")
    return "\n".join(lines)


def available(kind: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the YAML files in ``configs/<kind>/`` (models or methods)."""
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values")
    return data


def _parse_value(item: str, key: str, value: str) -> Any:
    """One ``key=value`` argument's value: None when empty; a path key's text as written (``~`` expanded); else YAML.

    Raises:
        ValueError: the value is not valid YAML (naming the argument).
    """
    if value == "":
        return None
    if key in PATH_KEYS:
        return os.path.expanduser(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"argument {item!r} is not valid YAML ({problem}); fix it: a list as [6, 8], text with "
                         "brackets or ': ' in quotes") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_steps=20", "mole.r=4", "output_dir=~/off"]`` -> ``{"max_steps": 20, "mole.r": 4, "output_dir":
    "/home/me/off"}``: values parsed as YAML, except ``PATH_KEYS``, taken as written with ``~`` expanded.

    Raises:
        ValueError: an argument is not ``key=value`` or its value is not valid YAML.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {item!r} is not key=value (e.g. max_steps=20)")
        overrides[key.strip()] = _parse_value(item, key.strip(), value)
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
                             "docs/config.md (or ldmole-train --help)")


def _selected(selector: str, overrides: dict[str, Any], names: Sequence[str]) -> str:
    """The model / task / method a run selects (its default unless overridden), checked against ``names``."""
    name = str(overrides.get(selector, RunConfig.__dataclass_fields__[selector].default))
    if name not in names:
        raise ValueError(f"unknown {selector} {name!r}{did_you_mean(name, names)}; choose one of {list(names)}")
    return name


# .py files imported through ``imports``, by resolved path, so that each runs once per process.
_IMPORTED_FILES: dict[Path, ModuleType] = {}


def _find_file(entry: str) -> Path:
    """The ``.py`` file an ``imports`` entry names: a relative path from the current folder, else from the
    repository root (where run.sh and the sweep's runs start).

    Raises:
        ValueError: neither holds the file (naming both folders).
    """
    path = Path(os.path.expanduser(entry))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        folders = dict.fromkeys(str(c.parent) for c in candidates)
        raise ValueError(f"imports: no file {entry!r} (looked in {' and '.join(folders)})")
    return found.resolve()


def _import_file(path: Path) -> ModuleType:
    """The module of a ``.py`` file, imported once per process, under a name of its own (``ldmole_imports_``,
    the file's stem and a hash of its path) so that two files of one name do not collide."""
    if path not in _IMPORTED_FILES:
        name = f"ldmole_imports_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        _IMPORTED_FILES[path] = module
    return _IMPORTED_FILES[path]


def import_modules(entries: Any) -> list[str]:
    """Imports each entry of an ``imports`` setting, in order: a ``.py`` file (see :func:`_find_file`) or an
    importable module name (``my_pkg.routers``). Returns the entries as given, as a list (a single string is
    one entry; null none). Importing twice is a no-op.

    Raises:
        ValueError: an entry is not a non-empty string, or its module cannot be found or fails while
            importing (naming the entry and the error).
    """
    entries = [entries] if isinstance(entries, str) else list(entries or [])
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"imports={entries!r} must be a list of module names or .py files; {entry!r} is not")
        path = _find_file(entry) if entry.endswith(".py") else None
        try:
            _import_file(path) if path else importlib.import_module(entry)
        except ModuleNotFoundError as error:
            if path is None and error.name and (entry + ".").startswith(error.name + "."):
                raise ValueError(f"imports: no module {entry!r}: give its file instead (imports=path/to/"
                                 f"{entry.rsplit('.', 1)[-1]}.py) or put its folder on PYTHONPATH") from None
            raise ValueError(f"imports: importing {entry!r} failed: {type(error).__name__}: {error}") from error
        except Exception as error:
            raise ValueError(f"imports: importing {entry!r} failed: {type(error).__name__}: {error}") from error
    return entries


def import_env_modules() -> list[str]:
    """Imports the modules named in ``LDMOLE_IMPORTS`` (entries separated by ``os.pathsep``, as ``PYTHONPATH``);
    returns them.

    Raises:
        ValueError: as :func:`import_modules`, naming the variable.
    """
    entries = [entry for entry in os.environ.get(IMPORTS_ENV, "").split(os.pathsep) if entry.strip()]
    try:
        return import_modules(entries)
    except ValueError as error:
        raise ValueError(f"{error} (set in {IMPORTS_ENV})") from error


def _imports_hint(imports: Any) -> str:
    """For an error reading back a config composed with ``imports``: how to make its routers and tasks known."""
    if not imports:
        return ""
    entries = [imports] if isinstance(imports, str) else list(imports)
    return (f" (the run was composed with imports={entries}; reading its config back does not import them: "
            f"{IMPORTS_ENV}={os.pathsep.join(map(str, entries))} does)")


def _add_imports(imports: list[str], entries: Any, source: str) -> None:
    """Imports ``entries`` (an ``imports`` setting read from ``source``) and appends the new ones to ``imports``."""
    try:
        entries = import_modules(entries)
    except ValueError as error:
        raise ValueError(f"{error} (set in {source})") from error
    imports.extend(entry for entry in entries if entry not in imports)


def _apply_replication(flat: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Sets the keys of the ``replicate`` the command line names on top of the model and method files' ``flat``.

    Raises:
        ValueError: an unknown replicate value, a model the release never ran, or a command-line key that
            contradicts it (naming the key, both values and the fix).
    """
    name = overrides.get("replicate", "none")
    if not isinstance(name, str):
        raise ValueError(f"replicate={name!r} must be one of {REPLICATE_CHOICES}")
    keys = replication_keys(name, flat.get("chat_format", BackboneConfig.chat_format), flat["model"])
    given = {key: value for key, value in overrides.items() if key != "mole"}
    given.update({f"mole.{key}": value for key, value in (overrides.get("mole") or {}).items()})
    given = {key: ("yes" if value else "no") if isinstance(value, bool) and isinstance(keys.get(key), str) else value
             for key, value in given.items()}  # YAML reads a bare no/yes as a bool
    allowed = REPLICATIONS[name].alternatives if keys else {}
    clashes = [f"{key}={given[key]!r} (it sets {value!r})" for key, value in keys.items()
               if key in given and given[key] != value and given[key] not in allowed.get(key, ())]
    if clashes:
        raise ValueError(f"replicate={name} sets the keys it needs; the command line also gives {', '.join(clashes)}: "
                         f"drop them, or drop replicate (run.sh passes mixed_precision: set REPLICATE={name} in it "
                         "rather than passing replicate=)")
    for key, value in keys.items():
        value = given.get(key, value)  # an allowed alternative the command line gives
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            flat["mole"][sub] = value
        else:
            flat[key] = value


def compose_config(overrides: Sequence[str] | dict[str, Any] = (), config_dir: Path = CONFIG_DIR) -> RunConfig:
    """Defaults <- models/<model>.yaml <- methods/<method>.yaml <- ``replicate`` <- overrides, as a validated
    ``RunConfig`` (``replicate``'s keys: :mod:`ldmole.experiment.replication`; an override may not contradict them).

    ``mole`` keys merge key by key across the layers; ``imports`` lists add up (model file, method file,
    command line) and each is imported as soon as it is read, before ``task`` and ``mole`` are checked, so
    they may name what the imported modules register (as may ``LDMOLE_IMPORTS``'s, imported first).

    Raises:
        ValueError: an unknown key, model, task or method (naming it and the closest valid one),
            a module of ``imports`` that cannot be imported, a bad value (naming the key), or an invalid
            MoLE setting.
    """
    overrides = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    _check_override_keys(overrides)
    import_env_modules()
    flat: dict[str, Any] = {"mole": {}, "imports": []}
    for selector, kind in (("model", "models"), ("method", "methods")):
        name = _selected(selector, overrides, available(kind, config_dir))
        layer = _read_yaml(config_dir / kind / f"{name}.yaml")
        for key in layer:
            if key not in FILE_KEYS[kind]:
                raise ValueError(f"{config_dir / kind / name}.yaml sets {key!r}, which a {kind[:-1]} file may not set")
        _add_imports(flat["imports"], layer.pop("imports", None), f"{config_dir / kind / name}.yaml")
        flat.update(layer, mole={**flat["mole"], **(layer.get("mole") or {})}, **{selector: name})
    _add_imports(flat["imports"], overrides.pop("imports", None), "the command line")
    flat["task"] = _selected("task", overrides, list(TASKS))
    _apply_replication(flat, overrides)
    for key, value in overrides.items():
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            flat["mole"][sub] = value
        elif top == "mole":
            flat["mole"].update(value or {})
        else:
            flat[key] = value
    return RunConfig._from_flat(flat)
