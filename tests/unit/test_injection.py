"""Injection into stock tiny Qwen3 / Llama models: identity at init, what trains, records, save/load, PEFT."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ldmole
from ldmole import MoLEConfig, get_mole_model, load_mole, mole_parameters, routing_records, save_mole
from tests.helpers import tiny_model

ROUTERS = ["sparsegen", "sparsegen_fixed", "topk", "relu", "softmax", "lora"]


def make_config(router: str, **overrides) -> MoLEConfig:
    base = dict(router=router, num_experts=1 if router == "lora" else 4, top_k=2, r=4, alpha=8,
                lambda_hidden=16, fixed_lambda=0.3 if router == "sparsegen_fixed" else None)
    base.update(overrides)
    return MoLEConfig(**base)


def batch(vocab: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("router", ROUTERS)
def test_output_equals_base_model_at_init(family, router):
    ids, mask = batch()
    model = tiny_model(family)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    get_mole_model(model, make_config(router))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_all_seven_projections_replaced_and_plain_tensors_returned(family):
    model = get_mole_model(tiny_model(family, num_layers=2), make_config("sparsegen"))
    types = sorted({layer.module_type for layer in ldmole.mole_layers(model)})
    assert types == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(ldmole.mole_layers(model)) == 14
    layer = ldmole.mole_layers(model)[0]
    assert isinstance(layer(torch.randn(1, 2, layer.in_features)), torch.Tensor)


@pytest.mark.parametrize("router", ["sparsegen", "topk", "relu"])
def test_one_optimizer_step_changes_only_mole_weights(family, router):
    ids, mask = batch()
    model = get_mole_model(tiny_model(family, task="seq_cls"), make_config(router))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(mole_parameters(model)), "requires_grad must match the MoLE parameter protocol"
    assert any(n.startswith("score.") for n in trainable), "the classification head must train"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    records = routing_records(model)
    loss = out.loss + ldmole.load_balance_loss(records) + ldmole.router_z_loss(records)
    if router == "sparsegen":
        loss = loss + ldmole.sparsity_loss(records, 1)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "an optimiser step must change something"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:5]}"
    assert any(".lora_B" in n for n in changed) and any(".router." in n for n in changed)


@pytest.mark.parametrize("router", ROUTERS)
def test_save_then_load_into_fresh_model_gives_identical_logits(family, router, tmp_path):
    ids, mask = batch()
    model = get_mole_model(tiny_model(family, seed=0), make_config(router, lambda_sharing="module"))
    with torch.no_grad():
        for p in mole_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
        expected = model(input_ids=ids, attention_mask=mask).logits
    save_mole(model, tmp_path / "adapter")
    fresh = load_mole(tiny_model(family, seed=0), tmp_path / "adapter")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_shared_lambda_mlp_is_stored_once(tmp_path):
    model = get_mole_model(tiny_model("qwen3", num_layers=4), make_config("sparsegen"))
    save_mole(model, tmp_path)
    names = list(load_file(str(tmp_path / "adapter.safetensors")))
    lambda_names = [n for n in names if "fc1.weight" in n]
    # width sharing: one MLP for the hidden width (q,k,v,o,gate,up), one for the intermediate (down)
    assert sorted(lambda_names) == ["ldmole_lambda_mlps.width32.fc1.weight", "ldmole_lambda_mlps.width48.fc1.weight"]
    assert not any("base_layer" in n or "embed" in n for n in names), "only MoLE weights are saved"


@pytest.mark.parametrize("sharing, expected", [("width", 2), ("module", 7), ("layer", 4 * 2)])
def test_lambda_sharing_modes(sharing, expected):
    model = get_mole_model(tiny_model("llama", num_layers=4), make_config("sparsegen", lambda_sharing=sharing))
    assert len(model.ldmole_lambda_mlps) == expected


def test_load_rejects_mismatched_shapes_and_configs(tmp_path):
    model = get_mole_model(tiny_model("qwen3"), make_config("topk"))
    save_mole(model, tmp_path)
    from transformers import Qwen3Config, Qwen3ForCausalLM
    wider = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="shape"):
        load_mole(wider, tmp_path)
    other = get_mole_model(tiny_model("qwen3"), make_config("softmax"))
    with pytest.raises(ValueError, match="differs from the saved one"):
        load_mole(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="mole_config.json"):
        load_mole(tiny_model("qwen3"), tmp_path / "nowhere")


def test_lambda_computed_once_for_modules_sharing_an_input(monkeypatch):
    model = get_mole_model(tiny_model("qwen3", num_layers=3), make_config("sparsegen"))
    calls = [0]
    logsigmoid = torch.nn.functional.logsigmoid

    def counting_logsigmoid(x):
        calls[0] += 1
        return logsigmoid(x)

    monkeypatch.setattr(torch.nn.functional, "logsigmoid", counting_logsigmoid)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    # per layer: q/k/v share one input, o its own, gate/up share one, down its own -> 4, not 7
    assert calls[0] == 3 * 4
    records = {r.name: r for r in routing_records(model)}
    q, k = records["model.layers.0.self_attn.q_proj"], records["model.layers.0.self_attn.k_proj"]
    assert q.lam is k.lam


def test_records_under_no_grad_repeated_forwards_and_masks():
    model = get_mole_model(tiny_model("llama", num_layers=2), make_config("sparsegen"))
    ids, mask = batch()
    for _ in range(3):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        records = routing_records(model)
        assert len(records) == 14, "one record per MoLE layer, none left over from earlier forwards"
    assert all(r.weights.grad_fn is None for r in records)
    assert torch.equal(records[0].mask, mask.bool())
    model(input_ids=ids[:, :4])
    assert routing_records(model)[0].mask is None and routing_records(model)[0].weights.shape[:2] == (2, 4)


def test_decode_step_aligns_mask_with_new_tokens():
    model = get_mole_model(tiny_model("qwen3", num_layers=2), make_config("sparsegen"))
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        model(input_ids=next_ids, attention_mask=full_mask, past_key_values=out.past_key_values, use_cache=True)
    record = routing_records(model)[0]
    assert record.weights.shape == (2, 1, 4) and record.mask.shape == (2, 1) and record.mask.all()


@pytest.mark.parametrize("router", ["sparsegen", "relu"])
def test_gradient_checkpointing_gives_same_loss_grads_and_records(router):
    ids, mask = batch()
    results = []
    for checkpointing in (False, True):
        model = get_mole_model(tiny_model("qwen3", num_layers=3), make_config(router, dropout=0.0))
        torch.manual_seed(5)
        with torch.no_grad():
            for p in mole_parameters(model).values():
                p.normal_(0, 0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        records = routing_records(model)
        loss = out.loss + ldmole.load_balance_loss(records)
        if router == "sparsegen":
            loss = loss + ldmole.sparsity_loss(records, 1)
        loss.backward()
        n_after_backward = len(routing_records(model))
        grads = {n: p.grad.clone() for n, p in mole_parameters(model).items()}
        results.append((loss.detach(), len(records), n_after_backward, grads))
    (loss0, n0, m0, g0), (loss1, n1, m1, g1) = results
    torch.testing.assert_close(loss1, loss0)
    assert n0 == n1 == m0 == m1 == 21, "recomputation must not add or drop routing records"
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=f"gradient of {name} differs")


def test_lora_router_matches_peft_outputs_and_gradients(family):
    from peft import LoraConfig, get_peft_model

    ids, mask = batch()
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(tiny_model(family, seed=3),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    mole_model = get_mole_model(tiny_model(family, seed=3),
                                MoLEConfig(router="lora", num_experts=1, r=4, alpha=8, dropout=0.0, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in ldmole.mole_layers(mole_model):
            peft_layer = peft_model.get_submodule("base_model.model." + layer.name)
            peft_layer.lora_B["default"].weight.normal_(0, 0.1)
            layer.lora_A[0].copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B[0].copy_(peft_layer.lora_B["default"].weight)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    out_mole = mole_model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out_mole.logits, out_peft.logits, atol=1e-6, rtol=1e-5)
    out_peft.loss.backward()
    out_mole.loss.backward()
    for layer in ldmole.mole_layers(mole_model):
        peft_layer = peft_model.get_submodule("base_model.model." + layer.name)
        torch.testing.assert_close(layer.lora_A.grad[0], peft_layer.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad[0], peft_layer.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)


def test_routing_records_read_the_models_own_context_without_a_scan(monkeypatch):
    from ldmole.core.records import RoutingContext, routing_context_of

    model = get_mole_model(tiny_model("qwen3", num_layers=2), make_config("sparsegen"))
    context = routing_context_of(model)
    assert isinstance(context, RoutingContext)
    assert all(layer.routing_context is context for layer in ldmole.mole_layers(model))
    assert routing_context_of(ldmole.mole_layers(model)[0]) is context
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)

    def no_scan(self):
        raise AssertionError("routing_records scanned the model's modules")

    monkeypatch.setattr(torch.nn.Module, "modules", no_scan)
    records = routing_records(model)
    assert len(records) == 14 and [r.name for r in records] == list(context.records)
    monkeypatch.undo()
    # a wrapper that is not the model itself still finds the layers' records by a scan
    assert len(routing_records(torch.nn.ModuleList([model]))) == 14


def test_a_per_layer_lambda_adapter_round_trips(tmp_path):
    config = MoLEConfig(lambda_sharing="layer", num_experts=4, r=2)
    model = get_mole_model(tiny_model("qwen3", num_layers=3), config)
    # One λ-MLP per decoder layer and input width: hidden 32 (q,k,v,gate,up,o) and 48 (down).
    assert sorted(model.ldmole_lambda_mlps.keys()) == sorted(
        f"layer{layer}_width{width}" for layer in range(3) for width in (32, 48))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in mole_parameters(model).values():
            param.normal_(0, 0.1)
    save_mole(model, tmp_path / "adapter")
    loaded = load_mole(tiny_model("qwen3", num_layers=3), tmp_path / "adapter")
    saved_params, loaded_params = mole_parameters(model), mole_parameters(loaded)
    assert saved_params.keys() == loaded_params.keys()
    for name, param in saved_params.items():
        assert torch.equal(loaded_params[name], param), name
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
