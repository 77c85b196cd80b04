"""Turning a stock model into a MoLE model: find targeted ``nn.Linear`` layers and replace them."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .config import MoLEConfig
from .lambda_mlp import LambdaMLP
from .layer import MoLELinear
from .records import RoutingContext, attach_routing_context
from .routers import LORA, get_router, validate_mole_config

__all__ = ["get_mole_model", "mole_layers", "mole_parameters", "mole_config_of", "LAMBDA_MLPS_ATTR"]

LAMBDA_MLPS_ATTR = "ldmole_lambda_mlps"
_CONFIG_ATTR = "ldmole_config"


def _matches(name: str, targets) -> bool:
    """PEFT-style matching: a list of name suffixes, or one regex matched against the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_index(name: str) -> Optional[int]:
    """The first all-digit component of a module name (``model.layers.12.mlp.up_proj`` -> 12)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _lambda_key(sharing: str, module_type: str, layer_index: int, width: int) -> str:
    """Key of the λ-MLP a module uses under ``lambda_sharing`` (ModuleDict keys may not hold '.')."""
    if sharing == "width":
        return f"width{width}"
    if sharing == "module":
        return f"{module_type}_width{width}"
    return f"layer{layer_index}_width{width}"


def mole_layers(model: nn.Module) -> list[MoLELinear]:
    """Every ``MoLELinear`` of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, MoLELinear)]


def mole_config_of(model: nn.Module) -> Optional[MoLEConfig]:
    """The ``MoLEConfig`` that :func:`get_mole_model` applied to ``model``, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def mole_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that MoLE trains, by name: experts, routers, λ-MLPs (once) and trained heads.

    This is the protocol that decides what is trainable and what :func:`ldmole.save_mole` writes.
    """
    config = mole_config_of(model)
    heads = config.trainable_modules if config is not None else []
    params: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, MoLELinear):
            owned = [("lora_A", module.lora_A), ("lora_B", module.lora_B)]
            if module.router is not None:  # the router's own parameters; the shared λ-MLP is not among them
                owned.extend((f"router.{n}", p) for n, p in module.router.named_parameters())
        elif module_name == LAMBDA_MLPS_ATTR or (heads and _matches(module_name, heads)):
            owned = list(module.named_parameters())
        else:
            continue
        for param_name, param in owned:
            params[prefix + param_name] = param
    return params


def _register_hooks(model: nn.Module, context: RoutingContext) -> None:
    """Begin/end the shared routing context around every forward of ``model`` and of its decoder
    body (``model.base_model`` in transformers), so calling the body alone also records."""

    def begin(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[0]) and torch.is_tensor(args[1]):
            mask = args[1] if args[1].shape == args[0].shape[:2] else None
        context.begin(mask)

    def end(module, args, output):
        context.end()

    entry_points = [model]
    body = getattr(model, "base_model", model)
    if isinstance(body, nn.Module) and body is not model:
        entry_points.append(body)
    for module in entry_points:
        module.register_forward_pre_hook(begin, with_kwargs=True)
        module.register_forward_hook(end)


def get_mole_model(model: nn.Module, config: MoLEConfig) -> nn.Module:
    """Replaces every targeted ``nn.Linear`` of ``model`` by a ``MoLELinear`` (in place) and returns it.

    Works for any model built of ``nn.Linear`` (Qwen3 / Llama causal-LM and sequence-classification
    models of transformers 4.51+ and 5.x included): layers return plain tensors, so the stock
    modeling code runs unchanged. Every base parameter is frozen; only :func:`mole_parameters`
    train. λ-MLPs (for routers with a learned λ) are registered once under ``model.ldmole_lambda_mlps``.

    ``config`` is checked once here (``validate_mole_config``), not again by each layer. The model keeps
    one ``RoutingContext`` for all its layers (``ldmole.core.records.routing_context_of(model)``).

    Raises:
        ValueError: the config does not fit its router, the model is already a MoLE model,
            ``target_modules`` matches no ``nn.Linear``, or the per-layer expert counts do not fit the
            model (naming the field).
    """
    validate_mole_config(config)
    if mole_layers(model):
        raise ValueError("model already has MoLE layers; build a fresh base model to apply another MoLEConfig")
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and _matches(name, config.target_modules)
    ]
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})
        raise ValueError(
            f"MoLEConfig.target_modules={config.target_modules!r} matched no nn.Linear in {type(model).__name__}; "
            f"its linear layers end in {linear_names[:20]}"
        )
    layer_ids = sorted({_layer_index(name) or 0 for name, _ in targets})
    counts = dict(zip(layer_ids, config.experts_per_layer(len(layer_ids))))
    learned_lambda = config.router != LORA and get_router(config.router).learned_lambda

    for param in model.parameters():
        param.requires_grad_(False)

    context = RoutingContext()
    lambda_mlps = nn.ModuleDict()
    for name, base in targets:
        layer_index = _layer_index(name) or 0
        module_type = name.rsplit(".", 1)[-1]
        lambda_mlp = None
        if learned_lambda:
            key = _lambda_key(config.lambda_sharing, module_type, layer_index, base.in_features)
            if key not in lambda_mlps:
                lambda_mlps[key] = LambdaMLP(
                    base.in_features, config.lambda_hidden, config.lambda_eps, init=config.lambda_init,
                    bias_init=config.lambda_bias_init, input_norm=config.lambda_input_norm,
                ).to(base.weight.device).train(base.training)
                context.lambda_mlps.append(lambda_mlps[key])
            lambda_mlp = lambda_mlps[key]
        layer = MoLELinear(base, config, num_experts=counts[layer_index], name=name, layer_index=layer_index,
                           lambda_mlp=lambda_mlp, validated=True)
        layer.routing_context = context
        context.layers.append(layer)
        layer.train(base.training)  # new modules start in training mode; keep the model's mode
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)

    if len(lambda_mlps):
        model.add_module(LAMBDA_MLPS_ATTR, lambda_mlps)
    setattr(model, _CONFIG_ATTR, config)
    attach_routing_context(model, context)
    _register_hooks(model, context)
    for param in mole_parameters(model).values():
        param.requires_grad_(True)
    _keep_heads_in_float32(model, config)
    return model


def _keep_heads_in_float32(model: nn.Module, config: MoLEConfig) -> None:
    """Moves every trained head (``config.trainable_modules``) to float32 while the frozen base keeps
    its dtype: AdamW updates of a bf16 head at lr 1e-5 mostly round away. As PEFT does for its
    float32 adapters, the head casts its input to float32 and its output back to the base dtype,
    so the model runs with and without autocast (under autocast the matmul itself is bf16)."""
    heads = config.trainable_modules
    if not heads:
        return
    for name, module in model.named_modules():
        if not name or not _matches(name, heads) or isinstance(module, MoLELinear):
            continue
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if not dtypes or dtypes == {torch.float32}:
            continue
        base_dtype = dtypes.pop() if len(dtypes) == 1 else torch.get_default_dtype()
        module.float()

        def cast_input(head, args):
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        def cast_output(head, args, output, dtype=base_dtype):
            return output.to(dtype) if torch.is_tensor(output) and output.is_floating_point() else output

        module.register_forward_pre_hook(cast_input)
        module.register_forward_hook(cast_output)
