"""``replicate=reference``: one switch for the reference release's exact setting, where this code differs on purpose.

A replication is a set of flat config keys applied after the model and method files, plus the release's prompt
layout for the model's family. Composing refuses a command-line key that contradicts it (so a ``config.yaml``
that says ``replicate: reference`` always holds the release's setting), and a config that names it is checked
to hold every key (:func:`check_replication`). The λ-MLP initialisation stays the method's: ``ldmole_reference``
and ``ldmole_released`` are the release's, ``ldmole`` the live one (docs/faithfulness.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.suggest import did_you_mean

__all__ = ["Replication", "REPLICATIONS", "REPLICATE_CHOICES", "replication_keys", "check_replication"]


@dataclass(frozen=True)
class Replication:
    """The keys one ``replicate=`` value sets.

    Attributes:
        name: the ``replicate`` value.
        keys: flat config keys (``mole.<field>`` for the MoLE ones) and the values it sets.
        chat_formats: the model file's ``chat_format`` -> the release's layout for that family; a model whose
            format is not listed is refused (the release never ran it).
        alternatives: other values a key may be given besides it, where the release itself used them.
    """

    name: str
    keys: Mapping[str, Any]
    chat_formats: Mapping[str, str]
    alternatives: Mapping[str, tuple] = field(default_factory=dict)

    def allows(self, key: str, value: Any) -> bool:
        """Whether ``key=value`` agrees with this replication (its value or one of its alternatives)."""
        return value == self.keys[key] or value in self.alternatives.get(key, ())


REPLICATIONS: dict[str, Replication] = {
    "reference": Replication(
        name="reference",
        keys={
            "protocol": "reference",          # best epoch chosen on the split it reports (validation)
            "torch_dtype": "float32",         # Lightning's precision=16 keeps float32 weights ...
            "mixed_precision": "fp16",        # ... under fp16 autocast (finetune.py: precision = 16 on GPUs)
            "mole.router_input": "dropout",   # router and λ-MLP read dropout(x) (peft/tuners/lora.py)
        },
        # The release feeds Qwen3 `<|im_start|>` + raw prompt and Llama `<|begin_of_text|>` + raw prompt.
        chat_formats={"qwen3": "reference_qwen3", "reference_qwen3": "reference_qwen3",
                      "llama3": "reference_llama3", "reference_llama3": "reference_llama3"},
        # Without CUDA the release trains in float32 (precision = 32), and accelerate cannot autocast a CPU to fp16.
        alternatives={"mixed_precision": ("no",)},
    ),
}
REPLICATE_CHOICES = ("none", *REPLICATIONS)


def replication_keys(name: str, chat_format: str, model: str) -> dict[str, Any]:
    """The flat keys ``replicate=name`` sets for a model whose file says ``chat_format`` (empty for ``none``).

    Raises:
        ValueError: an unknown name, or a model the release never ran (naming the model and what it supports).
    """
    if name == "none":
        return {}
    if name not in REPLICATIONS:
        raise ValueError(f"replicate={name!r} is unknown{did_you_mean(name, REPLICATE_CHOICES)}; choose one of "
                         f"{REPLICATE_CHOICES}")
    replication = REPLICATIONS[name]
    if chat_format not in replication.chat_formats:
        raise ValueError(f"replicate={name} has no prompt layout of the reference release for model={model} "
                         f"(chat_format={chat_format}): it applies to models of chat_format "
                         f"{sorted(replication.chat_formats)} (Qwen3 and Llama-3, the paper's models)")
    return {**replication.keys, "chat_format": replication.chat_formats[chat_format]}


def check_replication(name: str, flat: Mapping[str, Any]) -> None:
    """Checks that a flat config (``mole.<field>`` keys spread) holds every key ``replicate=name`` sets.

    Raises:
        ValueError: a key differs (naming it, both values and the fix).
    """
    if name == "none":
        return
    replication = REPLICATIONS[name]
    wrong = [(key, flat.get(key), value) for key, value in replication.keys.items()
             if not replication.allows(key, flat.get(key))]
    if flat.get("chat_format") not in set(replication.chat_formats.values()):
        wrong.append(("chat_format", flat.get("chat_format"), " or ".join(sorted(set(replication.chat_formats.values())))))
    if wrong:
        said = "; ".join(f"{key}={value!r} where it sets {want!r}" for key, value, want in wrong)
        raise ValueError(f"replicate={name} contradicts {said}: drop those keys (replicate sets them) or drop "
                         f"replicate={name}")
