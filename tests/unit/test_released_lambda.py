"""`fixed_lambda: null` is the reference release's untrained λ, logsigmoid(lambda_bias_init) + 1 - lambda_eps
(its λ-MLP was out of the optimiser until the 2026-02-25 fix, docs/faithfulness.md), and the methods
`ldmole_released` / `ldmole_reference` set what the release computed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmole import MoLEConfig, MoLELinear, get_mole_model, routing_records, sparsegen
from tests.helpers import tiny_model


def _constant(bias_init: float, eps: float) -> float:
    return (F.logsigmoid(torch.tensor(bias_init, dtype=torch.float64)) + 1.0 - eps).item()


def _fixed_layer(seed: int = 0, **kwargs) -> MoLELinear:
    torch.manual_seed(seed)
    config = MoLEConfig(router="sparsegen_fixed", num_experts=6, r=4, alpha=8, dropout=0.0, **kwargs)
    return MoLELinear(nn.Linear(16, 12), config, num_experts=6)


def _route(layer: MoLELinear, x: torch.Tensor):
    layer(x)
    return routing_records(layer)[0]


def test_null_fixed_lambda_is_the_released_constant_from_the_config_fields():
    x = torch.randn(3, 5, 16)
    record = _route(_fixed_layer(), x)
    expected = _constant(-2.5, 0.01)
    assert expected == pytest.approx(-1.5888, abs=1e-4)
    torch.testing.assert_close(record.lam, torch.full((3, 5), expected))
    # Computed from lambda_bias_init and lambda_eps, not typed in.
    moved = _route(_fixed_layer(lambda_bias_init=-1.0, lambda_eps=0.05), x)
    torch.testing.assert_close(moved.lam, torch.full((3, 5), _constant(-1.0, 0.05)))
    assert _constant(-1.0, 0.05) != pytest.approx(expected)

    from ldmole.core.routers.sparsegen_fixed import released_lambda
    assert released_lambda(MoLEConfig(router="sparsegen_fixed")) == pytest.approx(expected, abs=1e-12)
    assert released_lambda(MoLEConfig(lambda_bias_init=3.0, lambda_eps=0.2)) == pytest.approx(_constant(3.0, 0.2))


def test_null_routes_exactly_like_the_explicit_constant():
    x = torch.randn(2, 7, 16)
    implicit = _route(_fixed_layer(seed=3), x)
    explicit = _route(_fixed_layer(seed=3, fixed_lambda=_constant(-2.5, 0.01)), x)
    assert torch.equal(implicit.scores, explicit.scores)
    assert torch.equal(implicit.weights, explicit.weights)
    torch.testing.assert_close(implicit.weights, sparsegen(implicit.scores, torch.full((2, 7), _constant(-2.5, 0.01))))
    assert (implicit.weights > 0).sum(-1).float().mean() > 1  # λ ≈ -1.59 routes densely


def test_explicit_fixed_lambda_wins():
    record = _route(_fixed_layer(fixed_lambda=0.3, lambda_bias_init=-1.0), torch.randn(2, 3, 16))
    assert torch.all(record.lam == 0.3)
    from ldmole.experiment.run_config import compose_config
    config = compose_config(["method=ldmole_released", "mole.fixed_lambda=0.3"])
    assert config.mole.fixed_lambda == 0.3


def test_methods_set_what_the_release_computed():
    from ldmole.experiment.run_config import compose_config
    released = compose_config(["method=ldmole_released"])
    reference = compose_config(["method=ldmole_reference"])
    m = released.mole
    assert (m.router, m.fixed_lambda, m.router_input) == ("sparsegen_fixed", None, "dropout")
    assert (m.lambda_bias_init, m.lambda_eps) == (-2.5, 0.01)
    r = reference.mole
    assert (r.router, r.lambda_init, r.lambda_sharing, r.router_input) == ("sparsegen", "reference", "width", "dropout")
    # Otherwise the settings of ldmole_reference.
    for key in ("num_experts", "top_k", "r", "alpha", "dropout", "target_modules", "router_input"):
        assert getattr(m, key) == getattr(r, key), key
    assert released.losses == reference.losses
    # The fixed-λ ablation's default is the released constant, not a typed value.
    assert compose_config(["method=sparsegen_fixed"]).mole.fixed_lambda is None


def test_mole_config_round_trip_keeps_null_and_the_constant(tmp_path):
    from ldmole.core.adapter_io import CONFIG_NAME, load_mole, save_mole
    config = MoLEConfig(router="sparsegen_fixed", num_experts=4, r=2, alpha=4, dropout=0.0)
    assert MoLEConfig.from_dict(json.loads(config.to_json())) == config
    model = get_mole_model(tiny_model("qwen3", num_layers=1), config)
    save_mole(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["fixed_lambda"] is None
    loaded = load_mole(tiny_model("qwen3", num_layers=1), tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        loaded(input_ids=ids)
    lams = [rec.lam for rec in routing_records(loaded)]
    assert lams and all(torch.allclose(lam, torch.full_like(lam, _constant(-2.5, 0.01))) for lam in lams)
