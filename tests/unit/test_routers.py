"""Each router's weights, the MoLA group spec, the config's validation, and the layer's efficient form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldmole import LambdaMLP, MoLEConfig, MoLELinear, get_mole_model, get_router, routing_records, validate_mole_config
from tests.helpers import tiny_model


def test_topk_keeps_exactly_k_renormalised():
    scores = torch.randn(50, 8)
    weights = get_router("topk").route_scores(scores, top_k=2)
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    top2 = torch.softmax(scores, -1).topk(2).values
    torch.testing.assert_close(weights.topk(2).values, top2 / top2.sum(-1, keepdim=True))


def _softmax_row(row: list[float]) -> list[float]:
    """Softmax of one row in plain Python (max-shifted)."""
    top = max(row)
    exps = [math.exp(u - top) for u in row]
    return [e / sum(exps) for e in exps]


def _topk_row(row: list[float], k: int) -> list[float]:
    """MoLA's routing of one row written out: softmax, keep the k largest by sorting, renormalise."""
    probs = _softmax_row(row)
    kept = sorted(range(len(row)), key=lambda i: probs[i], reverse=True)[:k]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(row))]


@pytest.mark.parametrize("router, reference", [
    ("topk", lambda row: _topk_row(row, 3)),
    ("relu", lambda row: [max(u, 0.0) for u in row]),
    ("softmax", _softmax_row),
])
def test_router_weights_match_a_plain_python_reference(router, reference):
    torch.manual_seed(3)
    scores = torch.randn(2, 4, 6) * 3  # distinct values, so the top-k choice is unambiguous
    weights = get_router(router).route_scores(scores, top_k=3)
    expected = [[reference(row) for row in batch] for batch in scores.tolist()]
    torch.testing.assert_close(weights, torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_relu_can_route_a_token_to_no_expert():
    weights = get_router("relu").route_scores(torch.tensor([[-1.0, -0.2, -3.0], [0.5, -1.0, 2.0]]))
    assert weights[0].sum() == 0, "all-negative scores must give zero experts under relu"
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.0, 2.0]))


def test_softmax_is_dense():
    weights = get_router("softmax").route_scores(torch.randn(20, 8) * 5)
    assert (weights > 0).all()


def test_sparsegen_fixed_uses_the_configured_lambda():
    torch.manual_seed(0)
    config = MoLEConfig(router="sparsegen_fixed", num_experts=6, r=4, alpha=8, dropout=0.0, fixed_lambda=0.7)
    layer = MoLELinear(nn.Linear(16, 12), config, num_experts=6)
    layer(torch.randn(3, 5, 16))
    record = routing_records(layer)[0]
    assert torch.all(record.lam == 0.7)
    from ldmole import sparsegen
    torch.testing.assert_close(record.weights, sparsegen(record.scores, torch.full((3, 5), 0.7)))


@pytest.mark.parametrize("num_layers, expected", [
    (4, [2, 4, 6, 8]),
    (28, [2] * 7 + [4] * 7 + [6] * 7 + [8] * 7),
    (6, [2, 2, 4, 4, 6, 8]),
])
def test_mola_group_spec_counts_per_layer(num_layers, expected):
    assert MoLEConfig(router="topk", num_experts="2468").experts_per_layer(num_layers) == expected


@pytest.mark.parametrize("num_layers", [4, 28])
def test_mola_2468_injected_into_model_gives_layer_counts(num_layers):
    model = tiny_model("qwen3", num_layers=num_layers)
    get_mole_model(model, MoLEConfig(router="topk", num_experts="2468", top_k=2, target_modules=["q_proj", "down_proj"]))
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, MoLELinear):
            per_layer.setdefault(module.layer_index, set()).add(module.num_experts)
    group = num_layers // 4
    expected = {i: {2 + 2 * (i // group)} for i in range(num_layers)}
    assert per_layer == expected


@pytest.mark.parametrize("kwargs, field", [
    (dict(lambda_eps=0.0), "lambda_eps"),
    (dict(lambda_eps=1.0), "lambda_eps"),
    (dict(lambda_sharing="global"), "lambda_sharing"),
    (dict(num_experts="24x8"), "num_experts"),
    (dict(target_modules=[]), "target_modules"),
    (dict(r=0), "r"),
    (dict(alpha="sixteen"), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(router_options=["temperature"]), "router_options"),
])
def test_invalid_field_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoLEConfig.{field}"):
        MoLEConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(router="topk", num_experts=2, top_k=3), "top_k"),
    (dict(router="magic"), "router"),
    # (no fixed_lambda is no longer refused: null is the reference release's untrained λ, tests/unit/test_released_lambda.py)
    (dict(router="sparsegen_fixed", fixed_lambda=1.0), "fixed_lambda"),
    (dict(router="lora", num_experts=8), "num_experts"),
    (dict(router="topk", router_options={"temperature": 2.0}), "router_options"),
])
def test_config_that_does_not_fit_its_router_is_refused_once_by_the_registry(kwargs, field):
    config = MoLEConfig(**kwargs)  # plain data: each field is fine on its own
    with pytest.raises(ValueError, match=f"MoLEConfig.{field}"):
        validate_mole_config(config)
    with pytest.raises(ValueError, match=f"MoLEConfig.{field}"):
        get_mole_model(tiny_model("qwen3", num_layers=1), config)


def test_unknown_router_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'sparsegen'"):
        validate_mole_config(MoLEConfig(router="sparsgen"))


def test_config_module_imports_no_router():
    import subprocess
    import sys

    code = "import sys, ldmole.core.config; assert 'ldmole.core.routers' not in sys.modules, sorted(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_get_mole_model_validates_the_config_once_not_per_layer(monkeypatch):
    from ldmole.core import injection, layer as layer_module

    calls = []

    def counting(config):
        calls.append(config)
        validate_mole_config(config)

    for module in (injection, layer_module):
        monkeypatch.setattr(module, "validate_mole_config", counting)
    config = MoLEConfig(router="topk", num_experts=4, r=2)
    model = get_mole_model(tiny_model("qwen3", num_layers=2), config)
    assert len(injection.mole_layers(model)) == 14 and calls == [config]


def test_target_modules_matching_nothing_raises():
    with pytest.raises(ValueError, match="target_modules"):
        get_mole_model(tiny_model("llama"), MoLEConfig(target_modules=["query"]))


def test_per_layer_list_length_must_match_layers():
    with pytest.raises(ValueError, match="num_experts has 3 entries"):
        get_mole_model(tiny_model("llama", num_layers=4), MoLEConfig(num_experts=[8, 8, 8]))


def test_config_json_round_trip():
    config = MoLEConfig(router="topk", num_experts="2468", top_k=2, target_modules=["q_proj"], lambda_sharing="layer")
    assert MoLEConfig.from_json(config.to_json()) == config
    assert "router_options" not in config.to_dict(), "left out while empty: saved files stay as they were"
    with_options = MoLEConfig(router="topk", router_options={"temperature": 2.0})
    assert MoLEConfig.from_json(with_options.to_json()) == with_options
    with pytest.raises(ValueError, match="no field 'topk'"):
        MoLEConfig.from_dict({"topk": 2})


def dense_reference(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Σ_e p_e B_e A_e x computed expert by expert (dropout off), the definition of the layer."""
    weights = routing_records(layer)[0].weights
    out = layer.base_layer(x)
    for e in range(layer.num_experts):
        out = out + layer.scaling * weights[..., e:e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T)
    return out


@pytest.mark.parametrize("router", ["sparsegen", "sparsegen_fixed", "topk", "relu", "softmax"])
def test_efficient_form_equals_expert_by_expert_sum(router):
    torch.manual_seed(1)
    mlp = LambdaMLP(16, 8, bias_init=0.5) if router == "sparsegen" else None
    config = MoLEConfig(router=router, num_experts=5, r=3, alpha=6, top_k=2, dropout=0.0, fixed_lambda=0.2)
    layer = MoLELinear(nn.Linear(16, 12), config, num_experts=5, lambda_mlp=mlp)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 7, 16)
    out = layer(x)
    torch.testing.assert_close(out, dense_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_layer_decode_shape_and_bf16_input():
    torch.manual_seed(0)
    config = MoLEConfig(router="sparsegen", num_experts=4, r=2, alpha=4, dropout=0.0)
    layer = MoLELinear(nn.Linear(16, 12).to(torch.bfloat16), config, num_experts=4, lambda_mlp=LambdaMLP(16, 8))
    out = layer(torch.randn(3, 1, 16, dtype=torch.bfloat16))
    assert out.shape == (3, 1, 12) and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    record = routing_records(layer)[0]
    assert record.weights.dtype == torch.float32 and record.lam.dtype == torch.float32


def test_router_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    config = MoLEConfig(router="sparsegen", num_experts=4, r=2, alpha=4, dropout=0.0)
    layer = MoLELinear(nn.Linear(16, 12), config, num_experts=4, lambda_mlp=LambdaMLP(16, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 16))
    record = routing_records(layer)[0]
    assert out.dtype == torch.bfloat16
    assert record.scores.dtype == torch.float32 and record.lam.dtype == torch.float32


def test_lora_a_is_kaiming_per_expert_and_b_is_zero():
    torch.manual_seed(0)
    config = MoLEConfig(router="softmax", num_experts=3, r=50, alpha=8, dropout=0.0)
    layer = MoLELinear(nn.Linear(400, 10), config, num_experts=3)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5) with fan_in = d_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert (layer.lora_B == 0).all()
