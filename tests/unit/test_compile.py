"""``torch.compile`` of MoLE layers: one forward and one backward graph, no graph break, for every router and
for a whole decoder layer; compiled (inductor) gives eager's outputs and gradients. The training run with
``compile=true`` is in tests/e2e/test_compile_runs.py."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from ldmole import LambdaMLP, MoLEConfig, MoLELinear, get_mole_model, mole_parameters, routing_records
from ldmole.core.compile import _blocks, compile_mole_model
from ldmole.core.injection import mole_layers
from tests.helpers import tiny_model

ROUTERS = ("sparsegen", "sparsegen_fixed", "softmax", "topk", "relu", "lora")


def make_layer(router: str, dropout: float = 0.1, router_input: str = "x") -> MoLELinear:
    torch.manual_seed(0)
    experts = 1 if router == "lora" else 4
    config = MoLEConfig(router=router, num_experts=experts, r=2, dropout=dropout, router_input=router_input,
                        fixed_lambda=0.2)
    mlp = LambdaMLP(16, 8) if router == "sparsegen" else None
    layer = MoLELinear(nn.Linear(16, 12).requires_grad_(False), config, num_experts=experts, lambda_mlp=mlp)
    nn.init.normal_(layer.lora_B)
    return layer


class GraphCounter:
    """A dynamo backend (AOTAutograd, eager kernels) counting the forward and backward graphs it compiles."""

    def __init__(self) -> None:
        self.forward = self.backward = 0

        def forward_compiler(gm, inputs):
            self.forward += 1
            return make_boxed_func(gm.forward)

        def backward_compiler(gm, inputs):
            self.backward += 1
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


def grads_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("training, router_input", [(True, "x"), (True, "dropout"), (False, "x")])
@pytest.mark.parametrize("router", ROUTERS)
def test_layer_compiles_to_one_forward_and_one_backward_graph(router, training, router_input):
    layer = make_layer(router, router_input=router_input if router != "lora" else "x").train(training)
    x = torch.randn(2, 5, 16, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(layer, backend=counter.backend, fullgraph=True)
    torch.manual_seed(3)
    out = compiled(x)
    out.sum().backward()
    assert (counter.forward, counter.backward) == (1, 1)
    assert len(routing_records(layer)) == (0 if router == "lora" else 1)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_decoder_layer_compiles_without_a_graph_break(family):
    model = get_mole_model(tiny_model(family, num_layers=2), MoLEConfig(router="sparsegen", num_experts=4, r=2))
    model.train()
    decoder = model.model.layers[1]
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    position = model.model.rotary_emb(hidden, torch.arange(5)[None])
    explained = torch._dynamo.explain(decoder)(hidden, position_embeddings=position, attention_mask=None)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_layer_gives_eager_outputs_and_gradients():
    """Inductor on CPU, with the dropout masks drawn as eager draws them (compile_mole_model's options)."""
    torch._dynamo.reset()
    layer = make_layer("sparsegen", dropout=0.3).train()
    params = {**dict(layer.named_parameters()), **{f"mlp.{n}": p for n, p in layer.lambda_mlp.named_parameters()}}
    x = torch.randn(2, 7, 16)
    g = torch.randn(2, 7, 12)
    results = []
    for compiled in (False, True):
        if compiled:
            assert compile_mole_model(layer) == [layer]
        xi = x.clone().requires_grad_(True)
        for p in params.values():
            p.grad = None
        torch.manual_seed(11)
        out = layer(xi)
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, grads_of(params), routing_records(layer)[0].weights.detach()))
    (out0, gx0, grads0, w0), (out1, gx1, grads1, w1) = results
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1, w0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    assert grads1.keys() == grads0.keys() == {"lora_A", "lora_B", "router.weight", "mlp.fc1.weight", "mlp.fc1.bias",
                                              "mlp.fc2.weight", "mlp.fc2.bias"}
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-5, rtol=1e-5, msg=name)
    # another dropout draw changes the output: the comparison above saw the masks
    torch.manual_seed(12)
    assert not torch.allclose(layer(x), out0, atol=1e-4)


def test_compile_mole_model_compiles_each_decoder_layer_once():
    model = get_mole_model(tiny_model("qwen3", num_layers=3), MoLEConfig(router="softmax", num_experts=2, r=2))
    blocks = _blocks(model)
    assert blocks == list(model.model.layers)
    assert all(any(layer in list(block.modules()) for block in blocks) for layer in mole_layers(model))
    with pytest.raises(ValueError, match="no MoLE layer"):
        compile_mole_model(tiny_model("qwen3", num_layers=1))
    standalone = make_layer("softmax")
    assert _blocks(nn.Sequential(standalone)) == [standalone]


def test_mole_parameters_are_unchanged_by_compiling():
    model = get_mole_model(tiny_model("llama", num_layers=2), MoLEConfig(router="sparsegen", num_experts=2, r=2))
    before = dict(mole_parameters(model))
    compile_mole_model(model)
    after = mole_parameters(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
