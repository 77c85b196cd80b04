"""`MoLEConfig`: what gets adapted and how it is routed (plain, JSON round-trippable data).

Each field is checked on its own here (type, range, choice list). What needs the router registry
(the router name, the router's own settings, how ``top_k`` fits the expert counts) is checked once
per model by ``ldmole.core.routers.validate_mole_config``, which ``get_mole_model`` calls; this
module imports no router, so the routers may import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Union

from .suggest import did_you_mean

__all__ = ["MoLEConfig", "LAMBDA_INITS", "LAMBDA_INPUT_NORMS", "LAMBDA_SHARING", "ROUTER_INPUTS",
           "DEFAULT_TARGET_MODULES"]

# The choice lists of the λ and router-input fields, defined here only (the λ-MLP and the run
# config read them from this module).
LAMBDA_INITS = ("live", "reference")
LAMBDA_INPUT_NORMS = ("none", "rms")
LAMBDA_SHARING = ("width", "module", "layer")
ROUTER_INPUTS = ("x", "dropout")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ExpertSpec = Union[int, list, str]


def _parse_group_spec(spec: str) -> list[int]:
    """'2468' -> [2, 4, 6, 8]; '16,16,8,8' -> [16, 16, 8, 8] (comma form for counts above 9)."""
    parts = spec.split(",") if "," in spec else list(spec)
    if not parts or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"MoLEConfig.num_experts={spec!r}: a group spec is a string of digits such as '8888' or '2468' "
            "(or comma-separated counts such as '16,16,8,8')"
        )
    return [int(p) for p in parts]


def _as_number(name: str, value: Any) -> Union[int, float]:
    """A finite int or float (a numeric string, as YAML reads ``1e-2``, becomes a float); else an error naming
    the field. Ints stay ints, so the saved config keeps the value as written."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"MoLEConfig.{name}={value!r} must be a finite number")
    return value


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class MoLEConfig:
    """Mixture-of-LoRA-experts settings; every field is saved to ``mole_config.json`` (``router_options`` only
    when it is set, so configs without one keep their files and run identities)."""

    router: str = field(
        default="sparsegen",
        metadata={"help": "Routing function: sparsegen (LD-MoLE, λ from the λ-MLP), sparsegen_fixed "
                  "(constant λ = fixed_lambda), topk (MoLA), relu (ReMoLE), softmax (dense MoLE), "
                  "lora (one expert, no router: plain LoRA), or any router registered with "
                  "ldmole.core.routers.register_router."},
    )
    num_experts: ExpertSpec = field(
        default=8,
        metadata={"help": "Experts per adapted layer: an int, a per-layer list, or a MoLA group spec "
                  "such as '8888' / '2468' (the layers split into len(spec) contiguous groups)."},
    )
    top_k: int = field(
        default=2,
        metadata={"help": "topk: experts kept per token. relu: target active experts for the ReMoLE "
                  "L1 controller (target sparsity 1 - top_k/E)."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank of each expert."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the expert sum is scaled by alpha / r."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the experts' input."})
    target_modules: Union[list, str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "nn.Linear modules to adapt: a list of name suffixes (q_proj matches "
                  "model.layers.0.self_attn.q_proj) or one regex matched against the full name."},
    )
    trainable_modules: list = field(
        default_factory=lambda: ["score", "classifier"],
        metadata={"help": "Name suffixes of extra modules trained in full when present "
                  "(classification heads); absent names are ignored."},
    )
    lambda_hidden: int = field(default=256, metadata={"help": "Hidden width H of the λ-MLP (d_in -> H -> 1)."})
    lambda_sharing: str = field(
        default="width",
        metadata={"help": "One λ-MLP per input width across all layers and module types (width, the "
                  "reference release), per module type (module), or per decoder layer and width (layer)."},
    )
    fixed_lambda: Union[float, None] = field(
        default=None,
        metadata={"help": "λ for router=sparsegen_fixed (must be < 1); null: the reference release's untrained "
                  "constant logsigmoid(lambda_bias_init) + 1 - lambda_eps (-1.589 at the defaults)."},
    )
    lambda_eps: float = field(
        default=0.01, metadata={"help": "λ = logsigmoid(MLP(x)) + 1 - lambda_eps, so λ < 1 - lambda_eps."}
    )
    lambda_init: str = field(
        default="live",
        metadata={"help": "λ-MLP initialisation: live (hidden bias 0, output bias lambda_bias_init: units fire "
                  "and λ varies per token from the start) or reference (both biases lambda_bias_init, as the "
                  "authors' release: no hidden unit fires on real inputs, so λ starts as a learned constant)."},
    )
    lambda_bias_init: float = field(
        default=-2.5,
        metadata={"help": "Initial λ-MLP output bias (and hidden bias under lambda_init=reference); -2.5 starts "
                  "λ near logsigmoid(-2.5) + 1 - lambda_eps = -1.59, a near-dense start."},
    )
    lambda_input_norm: str = field(
        default="none",
        metadata={"help": "none, or rms: the λ-MLP reads x / RMS(x) (parameter-free), so one MLP shared by "
                  "all layers sees inputs of one scale."},
    )
    router_input: str = field(
        default="x",
        metadata={"help": "What the router and λ-MLP read: x (the module input; q/k/v and gate/up then share "
                  "one λ computation) or dropout (the experts' dropout(x), as the reference release)."},
    )
    router_options: dict = field(
        default_factory=dict,
        metadata={"help": "Settings of a router's own (a mapping such as {temperature: 2.0}); the router class "
                  "names the keys it takes and their defaults (Router.default_options). The built-in "
                  "routers take none."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.router, str) or not self.router:
            raise ValueError(f"MoLEConfig.router={self.router!r} must be a router name such as 'sparsegen'")
        for name, choices in (("lambda_sharing", LAMBDA_SHARING), ("lambda_init", LAMBDA_INITS),
                              ("lambda_input_norm", LAMBDA_INPUT_NORMS), ("router_input", ROUTER_INPUTS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"MoLEConfig.{name}={value!r} is unknown{did_you_mean(str(value), choices)}; "
                                 f"choose one of {choices}")
        for name in ("r", "top_k", "lambda_hidden"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"MoLEConfig.{name}={getattr(self, name)!r} must be a positive int")
        for name in ("alpha", "dropout", "lambda_eps", "lambda_bias_init"):
            setattr(self, name, _as_number(name, getattr(self, name)))
        if self.fixed_lambda is not None:
            self.fixed_lambda = _as_number("fixed_lambda", self.fixed_lambda)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout={self.dropout} must lie in [0, 1)")
        if not 0.0 < self.lambda_eps < 1.0:
            raise ValueError(f"MoLEConfig.lambda_eps={self.lambda_eps} must lie in (0, 1)")
        self._check_modules()
        if not isinstance(self.router_options, dict) or not all(isinstance(k, str) for k in self.router_options):
            raise ValueError(f"MoLEConfig.router_options={self.router_options!r} must be a mapping of setting names "
                             "to values, e.g. {'temperature': 2.0}")
        self.expert_counts()

    def _check_modules(self) -> None:
        """``target_modules``: a non-empty list of names or one regex; ``trainable_modules``: a list of names."""
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.trainable_modules, tuple):
            self.trainable_modules = list(self.trainable_modules)
        if not self.target_modules:
            raise ValueError("MoLEConfig.target_modules is empty: name at least one nn.Linear "
                             "(e.g. ['q_proj', 'v_proj'])")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"MoLEConfig.target_modules={self.target_modules!r} must be a list of module names "
                             "or one regex")
        if not isinstance(self.trainable_modules, list) or not all(isinstance(t, str) for t in self.trainable_modules):
            raise ValueError(f"MoLEConfig.trainable_modules={self.trainable_modules!r} must be a list of module names")

    def expert_counts(self) -> list[int]:
        """Every distinct expert count that ``num_experts`` names, sorted (checked; independent of the layer count)."""
        spec = self.num_experts
        if isinstance(spec, bool):
            counts = None
        elif isinstance(spec, int):
            counts = [spec]
        elif isinstance(spec, (list, tuple)):
            if not spec or not all(isinstance(c, int) and not isinstance(c, bool) for c in spec):
                raise ValueError(f"MoLEConfig.num_experts={spec!r}: a per-layer list must be a non-empty list of ints")
            self.num_experts = counts = list(spec)
        elif isinstance(spec, str):
            counts = _parse_group_spec(spec)
        else:
            counts = None
        if counts is None:
            raise ValueError(f"MoLEConfig.num_experts={spec!r} must be an int, a list of ints or a group spec "
                             "like '2468'")
        if any(c < 1 for c in counts):
            raise ValueError(f"MoLEConfig.num_experts={spec!r}: every layer needs at least 1 expert")
        return sorted(set(counts))

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """Expert count of each of ``num_layers`` layers (bottom to top).

        A group spec splits the layers into contiguous groups as evenly as possible, earlier groups
        taking the extra layer when the split is uneven ('2468' on 28 layers: 7 layers each).
        """
        spec = self.num_experts
        if isinstance(spec, int):
            return [spec] * num_layers
        if isinstance(spec, list):
            if len(spec) != num_layers:
                raise ValueError(
                    f"MoLEConfig.num_experts has {len(spec)} entries but the model has {num_layers} adapted layers; "
                    "give one count per layer or a group spec such as '2468'"
                )
            return list(spec)
        groups = _parse_group_spec(spec)
        if num_layers < len(groups):
            raise ValueError(f"MoLEConfig.num_experts={spec!r} has {len(groups)} groups but the model has only "
                             f"{num_layers} layers")
        base, extra = divmod(num_layers, len(groups))
        counts: list[int] = []
        for g, count in enumerate(groups):
            counts.extend([count] * (base + (1 if g < extra else 0)))
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (``router_options`` left out while empty)."""
        data = dataclasses.asdict(self)
        if not data["router_options"]:
            del data["router_options"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoLEConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the key."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"MoLEConfig has no field {key!r}{did_you_mean(key, names)}; fields: {names}")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MoLEConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
