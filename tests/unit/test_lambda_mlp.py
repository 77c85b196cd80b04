"""The λ-MLP: its formula, its initialisations (live vs the reference's dead one), its input options,
and that its weights train, save and load."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ldmole import LambdaMLP, MoLEConfig, get_mole_model, load_mole, routing_records, save_mole
from ldmole.core.injection import LAMBDA_MLPS_ATTR
from ldmole.experiment.run_config import compose_config
from tests.helpers import tiny_model

REFERENCE_START = float(np.log(1.0 / (1.0 + np.exp(2.5))) + 1.0 - 0.01)  # logsigmoid(-2.5) + 1 - eps


def inputs(rms: float, tokens: int = 512, width: int = 576, seed: int = 0) -> torch.Tensor:
    """Gaussian token inputs of the given root-mean-square, like a hidden state of that scale."""
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed)) * rms


@pytest.mark.parametrize("rms", [0.3, 1.0])
def test_live_init_fires_a_quarter_of_hidden_units_and_trains_fc1(rms):
    mlp = LambdaMLP(576, 256)
    x = inputs(rms)
    active = (mlp.hidden_activations(x) > 0).float().mean()
    assert active >= 0.25, f"only {active:.3f} of the hidden units fire at RMS {rms}; expected about half"
    mlp(x).sum().backward()
    assert mlp.fc1.weight.grad.abs().sum() > 0, "fc1 receives no gradient: the λ-MLP cannot learn per-token λ"


@pytest.mark.parametrize("rms", [0.3, 1.0])
def test_reference_init_has_no_active_unit_on_inputs_of_rms_up_to_one(rms):
    """Documents the reference release's defect: b1 = -2.5 kills every ReLU unit on real-scale inputs."""
    mlp = LambdaMLP(576, 256, init="reference")
    x = inputs(rms)
    fired = (mlp.hidden_activations(x) > 0).float().mean()
    assert fired < 1e-4, f"{fired} of the units fire with the reference init at RMS {rms}"
    lam = mlp(x)
    assert float(torch.quantile(lam.detach(), 0.95) - torch.quantile(lam.detach(), 0.05)) == 0.0, "λ should be one constant"
    assert float(lam.detach().median()) == pytest.approx(REFERENCE_START, abs=1e-6)
    if rms == 0.3:  # at RMS 1 a rare unit fires on a rare token (probability 7.5e-6)
        lam.sum().backward()
        assert mlp.fc1.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("input_norm", ["none", "rms"])
def test_lambda_matches_the_formula_computed_independently(input_norm):
    torch.manual_seed(1)
    mlp = LambdaMLP(12, 7, eps=0.05, input_norm=input_norm)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 5, 12) * 2.0
    xs = x.double().numpy()
    if input_norm == "rms":
        xs = xs / np.sqrt((xs ** 2).mean(-1, keepdims=True) + 1e-6)
    w1, b1 = mlp.fc1.weight.detach().double().numpy(), mlp.fc1.bias.detach().double().numpy()
    w2, b2 = mlp.fc2.weight.detach().double().numpy(), mlp.fc2.bias.detach().double().numpy()
    logit = np.maximum(xs @ w1.T + b1, 0.0) @ w2.T + b2
    expected = -np.log1p(np.exp(-logit[..., 0])) + 1.0 - 0.05
    np.testing.assert_allclose(mlp(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_rms_input_norm_makes_lambda_independent_of_input_scale():
    mlp = LambdaMLP(64, 32, input_norm="rms")
    x = inputs(1.0, width=64)
    torch.testing.assert_close(mlp(x * 0.2), mlp(x * 20.0), atol=1e-4, rtol=0)
    plain = LambdaMLP(64, 32)
    plain.load_state_dict(mlp.state_dict())
    assert (plain(x * 0.2) - plain(x * 20.0)).abs().max() > 0.1, "without the norm λ depends on the input scale"


def test_live_init_starts_near_dense_with_a_per_token_spread():
    lam = LambdaMLP(576, 256)(inputs(1.0))
    median = float(lam.median())
    spread = float(torch.quantile(lam, 0.95) - torch.quantile(lam, 0.05))
    assert abs(median - REFERENCE_START) < 0.25, f"live λ starts at {median}, expected near {REFERENCE_START:.3f}"
    assert spread > 0.1, f"live λ spread q95 - q05 = {spread}: expected a per-token spread"
    moved = LambdaMLP(576, 256, bias_init=0.0)(inputs(1.0)).median()
    assert abs(float(moved) - (np.log(0.5) + 0.99)) < 0.25, "lambda_bias_init sets the output bias, hence λ's start"


def test_methods_choose_the_lambda_initialisation():
    assert compose_config(["method=ldmole"]).mole.lambda_init == "live"
    assert compose_config(["method=ldmole_sparse_k2"]).mole.lambda_init == "live"
    assert compose_config(["method=ldmole_reference"]).mole.lambda_init == "reference"
    assert MoLEConfig().lambda_init == "live"
    with pytest.raises(ValueError, match="lambda_init='referense' is unknown.*did you mean 'reference'"):
        MoLEConfig(lambda_init="referense")


def test_model_files_set_mole_keys_under_the_method():
    config = compose_config(["model=llama3.1_8b", "method=ldmole"])
    assert config.mole.lambda_hidden == 512 and config.mole.router == "sparsegen"
    assert compose_config(["model=qwen3_1.7b", "method=ldmole"]).mole.lambda_hidden == 256
    assert compose_config(["model=llama3.1_8b", "mole.lambda_hidden=64"]).mole.lambda_hidden == 64


def test_sparsegen_fixed_runs_at_the_reference_constant():
    config = compose_config(["method=sparsegen_fixed", f"mole.fixed_lambda={REFERENCE_START}"])
    model = get_mole_model(tiny_model("qwen3"), config.mole)
    model(input_ids=torch.tensor([[1, 2, 3]]))
    lam = routing_records(model)[0].lam
    torch.testing.assert_close(lam, torch.full_like(lam, REFERENCE_START))


def test_lambda_mlp_weights_round_trip_through_save_and_load(tmp_path):
    model = get_mole_model(tiny_model("llama", seed=0), MoLEConfig(router="sparsegen", num_experts=4, lambda_hidden=8))
    with torch.no_grad():
        for p in getattr(model, LAMBDA_MLPS_ATTR).parameters():
            p.copy_(torch.randn_like(p))
    expected = getattr(model, LAMBDA_MLPS_ATTR).state_dict()
    save_mole(model, tmp_path)
    loaded = getattr(load_mole(tiny_model("llama", seed=0), tmp_path), LAMBDA_MLPS_ATTR).state_dict()
    assert sorted(loaded) == sorted(expected) and any(k.endswith("fc1.weight") for k in loaded)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=f"{key} not restored by load_mole")


@pytest.mark.parametrize("router_input", ["x", "dropout"])
def test_router_reads_the_chosen_input(router_input):
    torch.manual_seed(0)
    config = MoLEConfig(router="sparsegen", num_experts=4, dropout=0.5, router_input=router_input,
                        target_modules=["q_proj"])
    model = get_mole_model(tiny_model("qwen3", num_layers=1), config).train()
    layer = model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    layer.lora_dropout.register_forward_hook(lambda m, args, out: seen.update(x_drop=out))
    model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    record = routing_records(model)[0]
    source = seen["x_drop"] if router_input == "dropout" else seen["x"]
    torch.testing.assert_close(record.scores, source.float() @ layer.router.weight.float().t())
    torch.testing.assert_close(record.lam, layer.lambda_mlp(source))
    assert not torch.equal(seen["x"], seen["x_drop"]), "dropout 0.5 in training mode must change the input"
