"""Quantised base models (QLoRA, ldmole.experiment.quantization): the ``quantization`` key, the error when
bitsandbytes is missing, MoLE layers on bitsandbytes' 4-bit and 8-bit linears (forward and gradients), the
k-bit preparation, adapters saved from and loaded onto quantised and full-precision bases, and the
base-weight memory formula against the bytes a loaded model holds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ldmole import MoLEConfig, get_mole_model, mole_parameters
from ldmole.core.adapter_io import ADAPTER_FILES, TOKENIZER_FILES
from ldmole.core.layer import MoLELinear
from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.data import get_task
from ldmole.experiment.models import DTYPE_KWARG, load_base_model, load_tokenizer
from ldmole.experiment.pretrained import from_pretrained, save_adapter
from ldmole.experiment.quantization import (QUANTIZATIONS, MissingExtraError, base_weight_bytes,
                                            check_quantization_setup, llama31_8b_weight_memory, loaded_weight_bytes,
                                            quantization_of, quantize_built_model)
from ldmole.experiment.run_config import BackboneConfig, compose_config
from tests.helpers import tiny_model, tiny_run_config, trained_tiny_model

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes not installed (pip install -e '.[qlora]')")
BITS = ("nf4", "fp4", "int8")


def quantized_tiny(family: str, quantization: str, task: str = "causal_lm", dtype=torch.float32):
    """A tiny random model of ``family`` quantised as a random:<family> base is (built, saved, reloaded)."""
    return quantize_built_model(tiny_model(family, task), quantization, dtype, **{DTYPE_KWARG: dtype})


def dequantized_weight(linear) -> torch.Tensor:
    """The float32 weight [out, in] a bitsandbytes linear stands for."""
    import bitsandbytes as bnb

    if isinstance(linear, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()
    scales = linear.weight.SCB if linear.weight.SCB is not None else linear.state.SCB  # moved there by a forward
    return linear.weight.data.float() * scales.float().unsqueeze(1) / 127


# --- the key -------------------------------------------------------------------------------------------


def test_the_quantization_key_offers_exactly_what_the_loader_knows():
    spec = next(f for f in dataclasses.fields(BackboneConfig) if f.name == "quantization")
    assert spec.metadata["choices"] == QUANTIZATIONS and spec.default == "none"
    assert compose_config(["model=tiny_qwen3"]).backbone.quantization == "none"
    assert compose_config(["model=tiny_qwen3", "quantization=nf4"]).backbone.quantization == "nf4"


@pytest.mark.parametrize("value", ["nf5", "4bit", "true"])
def test_an_unknown_quantization_names_the_key_and_the_choices(value):
    with pytest.raises(ValueError, match=r"quantization='.*' is unknown.*choose one of "
                                         r"\('none', 'nf4', 'fp4', 'int8'\)"):
        compose_config(["model=tiny_qwen3", f"quantization={value}"])
    with pytest.raises(ValueError, match=r"quantization='q4' is unknown"):
        BackboneConfig(model_source="random:llama", quantization="q4")


def test_from_pretrained_refuses_an_unknown_quantization_before_loading(tmp_path):
    config = tiny_run_config()
    model = trained_tiny_model(config)
    save_adapter(model, tmp_path / "adapter", AdapterInfo.from_run(config, get_task("arc_e"), model))
    with pytest.raises(ValueError, match=r"quantization='q4' is unknown.*'nf4'"):
        from_pretrained(tmp_path / "adapter", quantization="q4")


# --- without bitsandbytes --------------------------------------------------------------------------------


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    """``import bitsandbytes`` fails, as where the qlora extra is not installed."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def test_a_quantised_base_without_bitsandbytes_names_the_qlora_extra(no_bitsandbytes):
    config = tiny_run_config("quantization=nf4")
    with pytest.raises(MissingExtraError, match=r"quantization=nf4 .*bitsandbytes.*pip install -e '\.\[qlora\]'"
                                                r".*quantization=none") as caught:
        load_base_model(config.backbone, "causal_lm", load_tokenizer(config.backbone.tokenizer))
    assert isinstance(caught.value, ValueError), "the commands print ValueErrors as 'error: ...' (exit status 2)"
    assert isinstance(caught.value, ImportError)
    with pytest.raises(MissingExtraError, match=r"\[qlora\]"):
        check_quantization_setup("int8")
    check_quantization_setup("none")  # a full-precision base needs no bitsandbytes
    plain = tiny_run_config()
    assert quantization_of(load_base_model(plain.backbone, "causal_lm", load_tokenizer(plain.backbone.tokenizer))) \
        == "none"


def test_ldmole_train_reports_the_missing_extra_before_anything_loads(no_bitsandbytes, tmp_path, capsys):
    from ldmole.cli.train import main

    out = tmp_path / "run"
    assert main(["model=tiny_qwen3", "task=arc_e", "quantization=int8", f"output_dir={out}"]) == 1  # train's error
    err = capsys.readouterr().err
    assert "error: quantization=int8" in err and "pip install -e '.[qlora]'" in err, err
    assert not out.exists(), "the run must stop before it writes anything"


# --- where it cannot work --------------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("launch", ["FSDP", "DEEPSPEED"])
def test_a_sharded_launch_with_a_quantised_base_is_refused_naming_both_ways_out(launch):
    from accelerate.utils import DistributedType

    with pytest.raises(ValueError, match=rf"quantization=nf4 cannot be combined with {launch}.*DDP.*"
                                         r"quantization=none"):
        check_quantization_setup("nf4", DistributedType[launch])
    check_quantization_setup("none", DistributedType[launch])
    check_quantization_setup("nf4", DistributedType.MULTI_GPU)  # DDP: one full quantised copy per process
    check_quantization_setup("nf4", DistributedType.NO)


# --- MoLE layers on quantised linears --------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", BITS)
def test_mole_layer_on_a_quantised_linear_is_its_quantised_output_plus_the_routed_experts(quantization):
    import bitsandbytes as bnb

    model = quantized_tiny("llama", quantization)
    base = model.model.layers[0].mlp.up_proj
    assert isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and isinstance(base, torch.nn.Linear)
    config = MoLEConfig(router="softmax", num_experts=3, r=2, alpha=6.0, dropout=0.0)
    layer = MoLELinear(base, config, num_experts=3).eval()
    assert (layer.in_features, layer.out_features) == (32, 48)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device == torch.device("cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(2, 5, 32)
        got = layer(x)
        base_out = base(x)
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
        experts = sum(3.0 * probs[..., e:e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(3))
    torch.testing.assert_close(got, base_out + experts, atol=1e-5, rtol=1e-5,
                               msg=f"{quantization}: expected base_layer(x) + (alpha/r) Σ p_e B_e A_e x")
    # base_layer(x) is the quantised weight's product (int8 also quantises x, row by row, hence its tolerance).
    tolerance = 0.05 if quantization == "int8" else 1e-5
    torch.testing.assert_close(base_out, F.linear(x, dequantized_weight(base)), atol=tolerance, rtol=tolerance)
    assert not torch.allclose(base_out, F.linear(x, tiny_model("llama").model.layers[0].mlp.up_proj.weight),
                              atol=1e-4), "the base output must be the quantised weight's, not the original's"


@needs_bitsandbytes
@pytest.mark.parametrize("quantization, dtype", [(q, torch.float32) for q in BITS] +
                         [("nf4", torch.bfloat16), ("int8", torch.bfloat16), ("nf4", torch.float16)])
def test_every_adapter_tensor_gets_a_gradient_and_no_base_weight_does(quantization, dtype, family):
    model = quantized_tiny(family, quantization, dtype=dtype)
    get_mole_model(model, MoLEConfig(num_experts=4, r=4))  # LD-MoLE: sparsegen with the shared λ-MLP
    wrapped = [m for m in model.modules() if isinstance(m, MoLELinear)]
    assert len(wrapped) == 7 * 4 and all(quantization_of(m) == quantization for m in wrapped)
    params = mole_parameters(model)
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)  # B = 0 at initialisation would leave A's gradient zero
    model.train()
    logits = model(input_ids=torch.randint(1, 96, (2, 7))).logits
    logits.float().logsumexp(-1).mean().backward()
    for name, param in params.items():
        assert param.dtype == torch.float32, f"{name}: adapters stay float32 on a {quantization} base"
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, (
            f"{name}: every adapter tensor must get a finite non-zero gradient ({quantization}, {dtype})")
    base_with_grad = [n for n, p in model.named_parameters() if n not in params and (p.requires_grad or
                                                                                     p.grad is not None)]
    assert not base_with_grad, f"base weights must stay frozen and gradient-free: {base_with_grad[:5]}"


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", BITS)
def test_training_after_an_evaluation_forward_gets_the_same_gradients(quantization):
    # bitsandbytes 0.50 repacks 4-bit weights for an inference kernel without autograd at the first no-grad eval
    # forward on AVX512-BF16 CPUs; prepare_kbit_model turns that off (on other CPUs this holds either way).
    model = quantized_tiny("llama", quantization)
    get_mole_model(model, MoLEConfig(num_experts=4, r=4, dropout=0.0))
    params = mole_parameters(model)
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    ids = torch.randint(1, 96, (2, 7))

    def gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        return {name: param.grad.clone() for name, param in params.items()}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what the trainer's selection pass does between epochs
    after = gradients()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0,
                                   msg=f"{name}: an evaluation pass must not change later gradients")


@needs_bitsandbytes
def test_kbit_preparation_keeps_norms_float32_and_a_bf16_head_fed_its_dtype():
    model = quantized_tiny("llama", "nf4", dtype=torch.bfloat16)
    norms = [(n, p.dtype) for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(dtype == torch.float32 for _, dtype in norms), norms
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(1, 96, (1, 6))
    hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.dtype == torch.float32 and hidden.requires_grad, "float32 norms, input gradients enabled"
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # the bf16 head takes the float32 states


@needs_bitsandbytes
def test_a_checkpoint_saved_quantised_is_prepared_like_one_quantised_on_loading(tmp_path):
    quantized_tiny("llama", "nf4", dtype=torch.bfloat16).save_pretrained(tmp_path / "saved")
    backbone = BackboneConfig(model_source=str(tmp_path / "saved"), torch_dtype="bfloat16")  # quantization none
    model = load_base_model(backbone, "causal_lm", None)
    assert quantization_of(model) == "nf4", "transformers applies the checkpoint's own quantization_config"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


@needs_bitsandbytes
def test_a_classification_head_stays_unquantised_and_trains_in_float32():
    model = quantized_tiny("qwen3", "nf4", task="classification", dtype=torch.bfloat16)
    assert type(model.score) is torch.nn.Linear, "bitsandbytes must leave the head it ends with unquantised"
    get_mole_model(model, MoLEConfig(num_experts=2, r=2))
    params = mole_parameters(model)
    assert params["score.weight"].dtype == torch.float32
    ids = torch.randint(1, 96, (2, 6))
    model(input_ids=ids).logits.float().sum().backward()
    assert params["score.weight"].grad is not None and params["score.weight"].grad.abs().sum() > 0


# --- adapters saved from and loaded onto quantised bases --------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_an_adapter_from_a_quantised_base_is_float32_only_and_says_so(quantization, tmp_path):
    config = tiny_run_config(f"quantization={quantization}")
    model = trained_tiny_model(config)
    assert quantization_of(model) == quantization
    save_adapter(model, tmp_path / "adapter", AdapterInfo.from_run(config, get_task("arc_e"), model))
    folder = tmp_path / "adapter"
    saved = load_file(str(folder / "adapter.safetensors"))
    assert saved.keys() == mole_parameters(model).keys(), "only the adapter is written, never a base weight"
    assert {t.dtype for t in saved.values()} == {torch.float32}
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "adapter.safetensors", "adapter_info.json", "mole_config.json"} <= names
    assert names <= ADAPTER_FILES | TOKENIZER_FILES, f"no base model file: {sorted(names)}"
    assert json.loads((folder / "adapter_info.json").read_text())["extra"] == {"quantization": quantization}
    card = (folder / "README.md").read_text()
    section = card.index("## Base model quantisation")
    assert section < card.index("## Use") and f"quantization={quantization}" in card[section:]
    assert 'quantization="none"' in card[section:], "the card says how to load it on a full-precision base"


def test_an_adapter_from_a_full_precision_base_records_no_quantisation(tmp_path):
    config = tiny_run_config()
    model = trained_tiny_model(config)
    save_adapter(model, tmp_path / "adapter", AdapterInfo.from_run(config, get_task("arc_e"), model))
    assert json.loads((tmp_path / "adapter" / "adapter_info.json").read_text())["extra"] == {}
    assert "quantisation" not in (tmp_path / "adapter" / "README.md").read_text()


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_an_adapter_moves_between_quantised_and_full_precision_bases(quantization, tmp_path):
    ids = torch.tensor([[5, 9, 200, 31, 7, 64]])
    trained = {}
    for q in ("none", quantization):
        config = tiny_run_config(f"quantization={q}")
        model = trained_tiny_model(config)
        trained[q] = model
        save_adapter(model, tmp_path / q, AdapterInfo.from_run(config, get_task("arc_e"), model))
    # The same seed gives the same adapter on both bases (the quantising reload draws no random number).
    for name, param in mole_parameters(trained["none"]).items():
        assert torch.equal(param, mole_parameters(trained[quantization])[name]), name
    quantised_logits, full_logits = _logits(trained[quantization], ids), _logits(trained["none"], ids)
    # Reloaded as trained (the recorded quantisation is the default): exactly the trained model's logits.
    reloaded = from_pretrained(tmp_path / quantization)
    assert quantization_of(reloaded) == quantization
    torch.testing.assert_close(_logits(reloaded, ids), quantised_logits, atol=0, rtol=0)
    # On a float32 base (check_base does not refuse it: the architecture is the same): the float32 model's logits,
    # close to the quantised ones but not equal to them.
    on_full = from_pretrained(tmp_path / quantization, quantization="none")
    assert quantization_of(on_full) == "none"
    torch.testing.assert_close(_logits(on_full, ids), full_logits, atol=1e-5, rtol=1e-5)
    gap = (full_logits - quantised_logits).abs().max().item()
    assert 0 < gap < 0.25 * full_logits.abs().max().item(), f"quantisation moved the logits by {gap}"
    # And the reverse: the float32 adapter on a quantised base is the quantised model.
    on_quantised = from_pretrained(tmp_path / "none", quantization=quantization)
    assert quantization_of(on_quantised) == quantization
    torch.testing.assert_close(_logits(on_quantised, ids), quantised_logits, atol=0, rtol=0)


# --- memory ---------------------------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", BITS)
@pytest.mark.parametrize("task", ["causal_lm", "classification"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_memory_formula_is_what_a_loaded_model_holds(quantization, task, dtype):
    computed = base_weight_bytes(tiny_model("llama", task), quantization, dtype)
    model = quantized_tiny("llama", quantization, task, dtype)
    loaded = loaded_weight_bytes(model)
    assert computed == loaded, f"{quantization} {task} {dtype}: computed {computed} bytes, the model holds {loaded}"
    with torch.no_grad():
        model(input_ids=torch.randint(1, 96, (1, 5)))  # int8 moves its row scales to the layer state
    assert loaded_weight_bytes(model) == computed, f"{quantization}: the count must not change after a forward"


def test_the_weight_memory_formula_of_an_unquantised_model_is_its_parameter_bytes():
    model = tiny_model("qwen3")
    assert base_weight_bytes(model, "none", torch.float32) == loaded_weight_bytes(model) == \
        4 * sum(p.numel() for p in model.parameters())
    assert base_weight_bytes(model, "none", torch.bfloat16) == 2 * sum(p.numel() for p in model.parameters())


def test_llama31_8b_weight_memory_from_its_parameter_count():
    table = llama31_8b_weight_memory()
    # Meta's model card: 8.03 B parameters; 6.98 B of them in the 224 decoder linears bitsandbytes quantises.
    assert table["parameters"] == 8_030_261_248
    assert table["quantized_parameters"] == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    unquantised = table["parameters"] - table["quantized_parameters"]  # embeddings, head, norms
    assert table["bytes"]["none"] == 2 * table["parameters"]
    # int8: a byte per quantised weight plus its row scales; the rest bf16 (norms float32).
    assert table["bytes"]["int8"] - table["quantized_parameters"] - 2 * unquantised == \
        4 * 32 * (2 * 4096 + 2 * 1024 + 2 * 14336 + 4096) + 2 * (32 * 2 + 1) * 4096
    # nf4: 4.127 bits a quantised weight (double-quantised block scales) plus the same unquantised rest.
    bits = 8 * (table["bytes"]["nf4"] - 2 * unquantised - 2 * (32 * 2 + 1) * 4096) / table["quantized_parameters"]
    assert 4.12 < bits < 4.13, bits
    assert [round(table["bytes"][q] / 1e9, 2) for q in ("none", "int8", "nf4")] == [16.06, 9.09, 5.70]
