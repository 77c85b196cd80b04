"""Run configuration: YAML files composed with ``key=value`` overrides, validated before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..core.config import MoLEConfig
from ..core.losses import LB_PROBS, REMOLE_L1_FORMS
from ..core.suggest import did_you_mean

__all__ = ["CONFIG_DIR", "compose_config", "parse_overrides", "available", "mole_config_from"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Keys that model / task / method files may set on top of defaults.yaml.
FILE_KEYS = {
    "models": ("model_source", "chat_format", "torch_dtype", "random_init", "tokenizer", "num_epochs", "mole"),
    "tasks": ("task_name",),
    "methods": ("mole", "lb_coef", "lb_probs", "sparsity_coef", "sparsity_k", "z_coef", "remole_initial_coef",
                "remole_rate", "remole_l1"),
}
# Keys whose value is one of a few names, checked when the config is composed.
CHOICES = {"lb_probs": LB_PROBS, "remole_l1": REMOLE_L1_FORMS}
SELECTORS = {"model": "models", "task": "tasks", "method": "methods"}


def available(kind: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the YAML files in ``configs/<kind>/`` (models, tasks or methods)."""
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
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


def compose_config(overrides: Sequence[str] | dict[str, Any] = (), config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """defaults.yaml <- models/<model> <- tasks/<task> <- methods/<method> <- overrides.

    Raises:
        ValueError: an unknown key, model, task or method (naming it and the closest valid one),
            or an invalid MoLE setting.
    """
    overrides = dict(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
    config = _read_yaml(config_dir / "defaults.yaml")
    allowed = set(config) | {k for keys in FILE_KEYS.values() for k in keys}
    mole_fields = set(MoLEConfig.__dataclass_fields__)
    for key in overrides:
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            if sub not in mole_fields:
                raise ValueError(f"unknown key {key!r}{did_you_mean(sub, sorted(mole_fields))} (mole.* keys: {sorted(mole_fields)})")
        elif key not in allowed:
            raise ValueError(f"unknown key {key!r}{did_you_mean(key, sorted(allowed))}; valid keys are listed in README.md")

    for selector, kind in SELECTORS.items():
        name = str(overrides.get(selector, config[selector]))
        names = available(kind, config_dir)
        if name not in names:
            raise ValueError(f"unknown {selector} {name!r}{did_you_mean(name, names)}; choose one of {names}")
        layer = _read_yaml(config_dir / kind / f"{name}.yaml")
        for key in layer:
            if key not in FILE_KEYS[kind]:
                raise ValueError(f"{config_dir / kind / name}.yaml sets {key!r}, which a {kind[:-1]} file may not set")
        mole = {**(config.get("mole") or {}), **(layer.pop("mole", None) or {})}  # mole.* keys merge across files
        config.update(layer, mole=mole)
        config[selector] = name

    config["mole"] = dict(config.get("mole") or {})
    for key, value in overrides.items():
        if isinstance(value, bool) and isinstance(config.get(key), str):
            value = "no" if value is False else "yes"  # YAML reads a bare no/yes as a bool
        top, _, sub = key.partition(".")
        if top == "mole" and sub:
            config["mole"][sub] = value
        elif top == "mole":
            config["mole"].update(value or {})
        else:
            config[key] = value
    if config.get("output_dir") is None:
        config["output_dir"] = f"runs/{config['model']}/{config['task']}/{config['method']}/seed{config['seed']}"
    for key, choices in CHOICES.items():
        if config.get(key) not in choices:
            value = str(config.get(key))
            raise ValueError(f"{key}={config.get(key)!r} is unknown{did_you_mean(value, choices)}; choose one of {choices}")
    mole_config_from(config)  # validates the MoLE settings now, before anything heavy happens
    return config


def mole_config_from(config: dict[str, Any]) -> MoLEConfig:
    """The ``MoLEConfig`` of a composed run config (errors name the ``mole.<field>`` key)."""
    try:
        return MoLEConfig(**config["mole"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"invalid mole settings for method={config.get('method')!r}: {error}") from None


def get_path(config: dict[str, Any], key: str) -> Optional[Path]:
    """``config[key]`` as a Path, or None."""
    value = config.get(key)
    return Path(value).expanduser() if value else None
