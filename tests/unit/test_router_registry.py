"""The router registry: facts and checks of the built-in routers, and a router added from outside the package."""

from __future__ import annotations

import json
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ldmole
from ldmole import (MoLEConfig, MoLELinear, Router, get_mole_model, load_mole, register_router, routing_records,
                    save_mole, validate_mole_config)
from ldmole.core.routers import BUILTIN_ROUTERS, LORA, aux_losses_of, get_router, router_names
from tests.helpers import tiny_model


@register_router
class SigmoidTop1Router(Router):
    """What a user writes: the top-scoring expert only, weighted by the sigmoid of its score."""

    name = "test_sigmoid_top1"

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        top = scores.argmax(-1, keepdim=True)
        return torch.zeros_like(scores).scatter(-1, top, torch.sigmoid(scores.gather(-1, top)))


def test_builtin_router_facts():
    assert BUILTIN_ROUTERS == ("sparsegen", "sparsegen_fixed", "topk", "relu", "softmax")
    assert router_names()[:5] == BUILTIN_ROUTERS and router_names()[-1] == LORA
    assert [n for n in BUILTIN_ROUTERS if get_router(n).dense] == ["softmax"]
    assert [n for n in BUILTIN_ROUTERS if get_router(n).learned_lambda] == ["sparsegen"]
    assert [n for n in BUILTIN_ROUTERS if not get_router(n).routes_every_token] == ["relu"]
    assert [n for n in BUILTIN_ROUTERS if "sparsity" in aux_losses_of(n)] == ["sparsegen"]
    assert [n for n in BUILTIN_ROUTERS if "l1" in aux_losses_of(n)] == ["relu"]
    assert aux_losses_of(LORA) == frozenset()


def test_get_router_names_the_closest_and_lora_has_no_class():
    with pytest.raises(ValueError, match="router='sparsgen' is unknown \\(did you mean 'sparsegen'\\?\\)"):
        get_router("sparsgen")
    with pytest.raises(ValueError, match="plain LoRA"):
        get_router(LORA)


def test_register_router_rejects_a_taken_name_and_unknown_losses():
    with pytest.raises(ValueError, match="already registered"):
        register_router(type("Other", (SigmoidTop1Router,), {}))
    with pytest.raises(ValueError, match="aux_losses has unknown losses \\['entropy'\\]"):
        register_router(type("Bad", (Router,), {"name": "test_bad", "aux_losses": frozenset({"entropy"})}))
    with pytest.raises(ValueError, match="name"):
        register_router(type("Nameless", (Router,), {}))


@register_router
class TemperedSoftmaxRouter(Router):
    """A router with a setting of its own: softmax(u / temperature). Only this class and a method YAML
    (``mole: {router: test_tempered_softmax, router_options: {temperature: 2.0}}``) name the setting."""

    name = "test_tempered_softmax"
    dense = True
    default_options = {"temperature": 1.0}

    @classmethod
    def validate(cls, config: MoLEConfig, counts) -> None:
        temperature = cls.resolved_options(config)["temperature"]
        if not temperature > 0:
            raise ValueError(f"MoLEConfig.router_options['temperature']={temperature!r} must be > 0")

    @classmethod
    def route_scores(cls, scores: torch.Tensor, *, top_k: int = 2, lam: Optional[torch.Tensor] = None,
                     temperature: float = 1.0) -> torch.Tensor:
        return torch.softmax(scores / temperature, dim=-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(router="topk", num_experts=2, top_k=3), "MoLEConfig.top_k=3 exceeds"),
    (dict(router="relu", num_experts=2, top_k=3), "MoLEConfig.top_k=3 exceeds"),
    (dict(router="sparsegen_fixed", fixed_lambda=1.5), "MoLEConfig.fixed_lambda=1.5"),
    (dict(router="test_tempered_softmax", router_options={"temperature": -1.0}), "must be > 0"),
    (dict(router="sparsegen"), "needs a lambda_mlp"),
])
def test_a_layer_built_alone_is_checked_by_its_router(kwargs, message):
    config = MoLEConfig(r=2, alpha=4, **{"num_experts": 4, **kwargs})
    with pytest.raises(ValueError, match=message):
        MoLELinear(nn.Linear(8, 6), config, num_experts=config.num_experts)


def test_a_layer_built_alone_needs_a_count_of_its_config():
    with pytest.raises(ValueError, match="num_experts=3 is not a count of MoLEConfig.num_experts='2468'"):
        MoLELinear(nn.Linear(8, 6), MoLEConfig(router="topk", num_experts="2468"), num_experts=3)


def test_layer_settings_all_come_from_the_config():
    config = MoLEConfig(router="topk", num_experts=4, top_k=3, r=2, alpha=6, dropout=0.25, router_input="dropout")
    layer = MoLELinear(nn.Linear(8, 6), config, num_experts=4, name="model.layers.1.mlp.up_proj", layer_index=1)
    assert (layer.r, layer.scaling, layer.lora_dropout.p, layer.router_input) == (2, 3.0, 0.25, "dropout")
    assert layer.router_name == "topk" and layer.router.top_k == 3 and layer.config is config
    assert not hasattr(layer, "router_kind")


def test_a_router_reads_its_own_setting_from_the_config(tmp_path):
    config = MoLEConfig(router="test_tempered_softmax", num_experts=4, r=2, router_options={"temperature": 4.0})
    model = get_mole_model(tiny_model("qwen3", num_layers=1), config)
    ids = torch.tensor([[3, 5, 7, 9]])
    model(input_ids=ids)
    for record in routing_records(model):
        torch.testing.assert_close(record.weights, torch.softmax(record.scores / 4.0, dim=-1))
    assert ldmole.mole_layers(model)[0].router.options == {"temperature": 4.0}

    # the setting travels in mole_config.json and comes back with load_mole
    save_mole(model, tmp_path)
    assert json.loads((tmp_path / "mole_config.json").read_text())["router_options"] == {"temperature": 4.0}
    fresh = load_mole(tiny_model("qwen3", num_layers=1), tmp_path)
    assert ldmole.mole_config_of(fresh) == config
    fresh(input_ids=ids)
    for record in routing_records(fresh):
        torch.testing.assert_close(record.weights, torch.softmax(record.scores / 4.0, dim=-1))

    # its default when the config leaves it out; the routing function alone takes it as a keyword
    default = get_mole_model(tiny_model("qwen3", num_layers=1), MoLEConfig(router="test_tempered_softmax", r=2))
    assert ldmole.mole_layers(default)[0].router.options == {"temperature": 1.0}
    scores = torch.randn(3, 4)
    torch.testing.assert_close(TemperedSoftmaxRouter.route_scores(scores), torch.softmax(scores, -1))


@pytest.mark.parametrize("options, message", [
    ({"temprature": 2.0}, r"router_options has 'temprature' \(did you mean 'temperature'\?\), which"),
    ({"temperature": "hot"}, r"router_options\['temperature'\]='hot' must be a float"),
    ({"temperature": 0.0}, "must be > 0"),
])
def test_router_options_are_checked_against_what_the_router_declares(options, message):
    config = MoLEConfig(router="test_tempered_softmax", router_options=options)
    with pytest.raises(ValueError, match=message):
        validate_mole_config(config)
    with pytest.raises(ValueError, match="router='softmax' does not take; it takes none"):
        validate_mole_config(MoLEConfig(router="softmax", router_options={"temperature": 2.0}))


def test_outside_router_injects_records_trains_and_round_trips(tmp_path):
    config = MoLEConfig(router="test_sigmoid_top1", num_experts=4, r=4, alpha=8, lambda_hidden=16)
    model = get_mole_model(tiny_model("qwen3", num_layers=2), config)
    assert not hasattr(model, ldmole.core.injection.LAMBDA_MLPS_ATTR), "no λ-MLP for a router without a learned λ"
    with torch.no_grad():
        for p in ldmole.mole_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    records = routing_records(model)
    assert len(records) == 14 and {r.router for r in records} == {"test_sigmoid_top1"}
    for record in records:
        assert ((record.weights > 0).sum(-1) == 1).all() and record.lam is None
        torch.testing.assert_close(record.weights.max(-1).values, torch.sigmoid(record.scores.max(-1).values))
    assert ldmole.l1_penalty(records).item() == 0.0 and ldmole.sparsity_loss(records, 1).item() == 0.0
    (out.loss + ldmole.load_balance_loss(records) + ldmole.router_z_loss(records)).backward()
    router_grads = [p.grad for n, p in model.named_parameters() if n.endswith(".router.weight")]
    assert len(router_grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in router_grads)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    save_mole(model, tmp_path)
    assert "model.layers.0.self_attn.q_proj.router.weight" in load_file(str(tmp_path / "adapter.safetensors"))
    fresh = load_mole(tiny_model("qwen3", num_layers=2), tmp_path)
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
