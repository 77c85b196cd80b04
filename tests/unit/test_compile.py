"""``torch.compile`` of MoLE layers: one forward and one backward graph, no graph break, for every router and
for a whole decoder layer; what ``compile_mole_model`` compiles. Inductor's outputs and gradients against
eager's, and a training run with ``compile=true``, are in tests/e2e/test_compile_runs.py (slow)."""

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


@pytest.mark.parametrize("tokens", [1, 10])  # at most r (decoding: the batched-GEMM update) and more
@pytest.mark.parametrize("router", ROUTERS)
def test_without_autograd_a_layer_compiles_to_one_graph(router, tokens):
    """Evaluation and generation under ``torch.no_grad`` take the layer's paths without autograd Functions."""
    layer = make_layer(router).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(layer)(torch.randn(1, tokens, 16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_decoder_layer_compiles_without_a_graph_break(family):
    model = get_mole_model(tiny_model(family, num_layers=2), MoLEConfig(router="sparsegen", num_experts=4, r=2))
    model.train()
    decoder = model.model.layers[1]
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    position = model.model.rotary_emb(hidden, torch.arange(5)[None])
    explained = torch._dynamo.explain(decoder)(hidden, position_embeddings=position, attention_mask=None)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


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


def test_compile_mole_model_is_exported_at_the_top_level():
    import ldmole

    assert ldmole.compile_mole_model is compile_mole_model and "compile_mole_model" in ldmole.__all__
