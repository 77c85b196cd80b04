"""MoLELinear's fused routing GEMM against the unfused path (the layer's code before the fusion), written
out here: router scores, the λ-MLP and the experts' A as separate ops. Same outputs and gradients of every parameter (float32 round-off) for
every router, with router input x and dropout(x), in training and evaluation, in float32, under bf16
autocast and with a bf16 input; which matrices share one GEMM; which parameters a gradient reaches; λ
computed once per distinct input of a model."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ldmole import LambdaMLP, MoLEConfig, MoLELinear, get_mole_model, routing_records
from ldmole.core.injection import mole_layers
from tests.helpers import tiny_model

ROUTERS = ("sparsegen", "sparsegen_fixed", "softmax", "topk", "relu", "lora")
D_IN, D_OUT, EXPERTS, RANK = 24, 20, 4, 3
# (training, dropout, router_input): evaluation; training with dropout read by the experts only; training
# with the router reading dropout(x) too; training without dropout.
MODES = [(False, 0.2, "x"), (True, 0.2, "x"), (True, 0.2, "dropout"), (True, 0.0, "x")]


def make_layer(router: str, dropout: float, router_input: str, input_norm: str = "none",
               dtype: torch.dtype = torch.float32) -> MoLELinear:
    """A small layer with random non-zero weights everywhere (B, λ-MLP biases), so every gradient is non-zero."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(dtype).requires_grad_(False)
    experts = 1 if router == "lora" else EXPERTS
    config = MoLEConfig(router=router, num_experts=experts, r=RANK, alpha=6.0, dropout=dropout, top_k=2,
                        fixed_lambda=0.2, router_input=router_input if router != "lora" else "x")
    mlp = LambdaMLP(D_IN, 16, input_norm=input_norm) if router == "sparsegen" else None
    layer = MoLELinear(base, config, num_experts=experts, lambda_mlp=mlp)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
        if mlp is not None:
            for p in mlp.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    return layer


def plain_forward(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """The unfused path, one op per matrix: base, dropout, router scores u = W_g x (float32), λ-MLP
    logsigmoid(W2 ReLU(W1 n(x) + b1) + b2) + 1 - eps, the routing function, then the rank-E·r experts."""
    config, mlp = layer.config, layer.lambda_mlp
    result = layer.base_layer(x)
    x_drop = layer.lora_dropout(x)
    a_cat = layer.lora_A.to(x_drop.dtype).reshape(layer.num_experts * layer.r, layer.in_features)
    b_cat = layer.lora_B.to(x_drop.dtype).permute(1, 0, 2).reshape(layer.out_features, layer.num_experts * layer.r)
    hidden = F.linear(x_drop, a_cat)
    if layer.router is not None:
        route_in = x_drop if config.router_input == "dropout" else x
        with torch.autocast(device_type="cpu", enabled=False):
            scores = F.linear(route_in.float(), layer.router.weight.float())
            lam: Optional[torch.Tensor] = None
            if mlp is not None:
                h = route_in.float()
                if mlp.input_norm == "rms":
                    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
                h = F.relu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias))
                lam = F.logsigmoid(F.linear(h, mlp.fc2.weight, mlp.fc2.bias).squeeze(-1)) + 1.0 - mlp.eps
            elif config.router == "sparsegen_fixed":
                lam = torch.full(scores.shape[:-1], 0.2)
            weights = type(layer.router).route_scores(scores, top_k=config.top_k, lam=lam)
        scaled = hidden.unflatten(-1, (layer.num_experts, layer.r)) * weights.unsqueeze(-1).to(hidden.dtype)
        hidden = scaled.flatten(-2)
    update = hidden.to(result.dtype) @ b_cat.t().to(result.dtype)
    return result + layer.scaling * update


def trainable(layer: MoLELinear) -> dict[str, nn.Parameter]:
    """Every parameter a gradient may reach: the adapter's, the router's, the λ-MLP's and the frozen base's."""
    named = dict(layer.named_parameters())
    if layer.lambda_mlp is not None:
        named.update({f"lambda_mlp.{n}": p for n, p in layer.lambda_mlp.named_parameters()})
    return named


def run(layer: MoLELinear, forward, x: torch.Tensor, g: torch.Tensor,
        autocast: bool) -> dict[str, Optional[torch.Tensor]]:
    """Output and every gradient (None where none arrives) of ``sum(forward(layer, x) * g)``, dropout drawn
    from seed 7."""
    for p in trainable(layer).values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        out = forward(layer, x)
    (out.float() * g).sum().backward()
    results = {"out": out.detach().float(), "x": x.grad.float()}
    results.update({name: None if p.grad is None else p.grad.clone() for name, p in trainable(layer).items()})
    return results


def assert_same(fused: dict, plain: dict, tol: float) -> None:
    assert fused.keys() == plain.keys()
    for name in plain:
        if plain[name] is None:
            assert fused[name] is None, f"{name}: the fused path gives a gradient where the plain one gives none"
            continue
        assert fused[name] is not None, f"{name}: no gradient on the fused path"
        scale = plain[name].abs().max().clamp_min(1e-6)
        error = float((fused[name].float() - plain[name].float()).abs().max() / scale)
        assert error < tol, f"{name}: relative difference {error:.2e} >= {tol}"


@pytest.mark.parametrize("training, dropout, router_input", MODES)
@pytest.mark.parametrize("router", ROUTERS)
def test_fused_layer_matches_the_plain_path_in_outputs_and_every_gradient(router, training, dropout, router_input):
    layer = make_layer(router, dropout, router_input).train(training)
    x, g = torch.randn(2, 5, D_IN), torch.randn(2, 5, D_OUT)
    fused, plain = run(layer, MoLELinear.__call__, x, g, False), run(layer, plain_forward, x, g, False)
    assert_same(fused, plain, tol=1e-5)
    assert fused["base_layer.weight"] is None, "the frozen base must get no gradient"
    reached = {name for name, grad in fused.items() if grad is not None and grad.abs().sum() > 0}
    expected = {"out", "x", "lora_A", "lora_B"} | ({"router.weight"} if router != "lora" else set())
    if router == "sparsegen":
        expected |= {"lambda_mlp.fc1.weight", "lambda_mlp.fc1.bias", "lambda_mlp.fc2.weight", "lambda_mlp.fc2.bias"}
    assert reached == expected


@pytest.mark.parametrize("training, dropout, router_input", MODES)
@pytest.mark.parametrize("router, input_norm", [(router, "none") for router in ROUTERS] + [("sparsegen", "rms")])
def test_fused_layer_matches_the_plain_path_under_bf16_autocast(router, input_norm, training, dropout, router_input):
    layer = make_layer(router, dropout, router_input, input_norm).train(training)
    x, g = torch.randn(2, 5, D_IN), torch.randn(2, 5, D_OUT)
    fused, plain = run(layer, MoLELinear.__call__, x, g, True), run(layer, plain_forward, x, g, True)
    # The routing is float32 on both paths; the experts run in bf16, where a weight that differs in its last
    # float32 bit may round to another bf16 value.
    assert_same(fused, plain, tol=2e-2)


@pytest.mark.parametrize("router", ["sparsegen", "softmax"])
def test_fused_layer_matches_the_plain_path_on_a_bf16_input(router):
    layer = make_layer(router, 0.0, "x", dtype=torch.bfloat16).eval()
    x, g = torch.randn(2, 5, D_IN).to(torch.bfloat16), torch.randn(2, 5, D_OUT)
    fused, plain = run(layer, MoLELinear.__call__, x, g, False), run(layer, plain_forward, x, g, False)
    assert_same(fused, plain, tol=2e-2)


class MatmulLog(TorchFunctionMode):
    """Records, for every ``F.linear`` call, the parameters whose rows form its weight (``torch.cat`` ed or not)."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.linears: list[set[str]] = []
        self._cats: dict[int, set[str]] = {}
        self._views: dict[int, str] = {}
        self._alive: list[torch.Tensor] = []  # keeps the tensors whose ids are recorded from being reused

    def _names(self, tensor: torch.Tensor) -> set[str]:
        if id(tensor) in self._cats:
            return self._cats[id(tensor)]
        named = {name for name, p in self.params.items() if tensor is p or self._views.get(id(tensor)) == name}
        return named

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.cat:
            self._cats[id(out)] = set().union(*(self._names(t) for t in args[0]))
            self._alive.append(out)
        elif func in (torch.Tensor.reshape, torch.Tensor.float, torch.Tensor.to) and torch.is_tensor(args[0]):
            for name in self._names(args[0]):
                self._views[id(out)] = name
                self._alive.append(out)
        elif func is F.linear and self._names(args[1]):  # not the frozen base's
            self.linears.append(self._names(args[1]))
        return out


def linears_of(layer: MoLELinear, x: torch.Tensor, autocast: bool = False) -> list[set[str]]:
    params = {"W_g": layer.router.weight, "A": layer.lora_A}
    if layer.lambda_mlp is not None:
        params.update(W1=layer.lambda_mlp.fc1.weight, W2=layer.lambda_mlp.fc2.weight)
    log = MatmulLog(params)
    with log, torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        layer(x)
    return log.linears


@pytest.mark.parametrize("training, dropout, router_input, autocast, expected", [
    (False, 0.2, "x", False, [{"W_g", "W1", "A"}, {"W2"}]),          # evaluation: one GEMM reads x
    (True, 0.0, "x", False, [{"W_g", "W1", "A"}, {"W2"}]),           # no dropout: the same
    (True, 0.2, "dropout", False, [{"W_g", "W1", "A"}, {"W2"}]),     # all read dropout(x)
    (True, 0.2, "x", False, [{"W_g", "W1"}, {"W2"}, {"A"}]),         # the experts read dropout(x), routing x
    (False, 0.2, "x", True, [{"W_g", "W1"}, {"W2"}, {"A"}]),         # experts in bf16, routing in float32
])
def test_which_matrices_share_one_gemm(training, dropout, router_input, autocast, expected):
    layer = make_layer("sparsegen", dropout, router_input).train(training)
    assert linears_of(layer, torch.randn(2, 5, D_IN), autocast) == expected


def test_an_rms_normed_lambda_mlp_keeps_its_own_gemm():
    layer = make_layer("sparsegen", 0.0, "x", input_norm="rms").eval()
    assert linears_of(layer, torch.randn(2, 5, D_IN)) == [{"W_g", "A"}, {"W1"}, {"W2"}]


def test_a_gradient_reaches_only_what_the_loss_reads():
    """Two layers fed one tensor share the λ of the first one's GEMM. A loss on the second's output reaches
    the λ-MLP and the second layer's parameters; the first layer's router and experts, whose GEMM computed
    that λ, get nothing (no gradient, or an exactly zero one), nor does any base weight."""
    torch.manual_seed(0)
    mlp = LambdaMLP(D_IN, 16)
    config = MoLEConfig(router="sparsegen", num_experts=EXPERTS, r=RANK, dropout=0.0)
    first, second = (MoLELinear(nn.Linear(D_IN, D_OUT).requires_grad_(False), config, num_experts=EXPERTS,
                                lambda_mlp=mlp).eval() for _ in range(2))
    for layer in (first, second):
        nn.init.normal_(layer.lora_B)
    # one model's context, so the λ memo outlives the first layer's forward (as q/k/v in a decoder layer)
    second.routing_context = first.routing_context
    first.routing_context.standalone = False
    first.routing_context.recording = True
    x = torch.randn(2, 5, D_IN)
    first(x)
    second(x).sum().backward()
    mlp.clear_cache()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (second.router.weight, second.lora_A,
                                                                           second.lora_B))
    for p in (first.router.weight, first.lora_A, first.lora_B):
        assert p.grad is None or not p.grad.any()
    assert first.base_layer.weight.grad is None and second.base_layer.weight.grad is None


class FirstLayerLog(TorchFunctionMode):
    """Counts, per MoLE layer, the GEMMs that read the λ-MLP's first layer W1 (alone or concatenated)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fc1 = {id(mlp.fc1.weight) for mlp in model.ldmole_lambda_mlps.values()}
        self.current = ""
        self.calls: list[str] = []
        self._cats: set[int] = set()
        self._alive: list[torch.Tensor] = []  # keeps the tensors whose ids are recorded from being reused
        for layer in mole_layers(model):
            layer.register_forward_pre_hook(lambda module, args: setattr(self, "current", module.name))

    def _reads_fc1(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.fc1 or id(tensor) in self._cats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.cat and any(self._reads_fc1(t) for t in args[0]):
            self._cats.add(id(out))
            self._alive.append(out)
        elif func is F.linear and self._reads_fc1(args[1]):
            self.calls.append(self.current)
        return out


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("training", [True, False])
def test_lambda_first_layer_runs_once_per_distinct_input(family, training):
    """q/k/v read one tensor, o its own, gate/up one, down its own: W1 is evaluated by q, o, gate and down."""
    model = get_mole_model(tiny_model(family, num_layers=3),
                           MoLEConfig(router="sparsegen", num_experts=4, r=2, lambda_hidden=16)).train(training)
    log = FirstLayerLog(model)
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with log:
        model(input_ids=ids).logits.sum().backward()
    expected = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj",
                                                                  "mlp.gate_proj", "mlp.down_proj")]
    assert log.calls == expected
    records = {r.name: r for r in routing_records(model)}
    for i in range(3):
        q, k, v = (records[f"model.layers.{i}.self_attn.{m}_proj"] for m in "qkv")
        gate, up = (records[f"model.layers.{i}.mlp.{m}_proj"] for m in ("gate", "up"))
        assert q.lam is k.lam is v.lam and gate.lam is up.lam and q.lam is not gate.lam
    assert all(p.grad is not None for mlp in model.ldmole_lambda_mlps.values() for p in mlp.parameters())


def test_lambda_memo_is_not_reused_after_a_parameter_or_grad_mode_change():
    layer = make_layer("sparsegen", 0.0, "x").eval()
    mlp = layer.lambda_mlp
    x = torch.randn(2, 5, D_IN)
    lam = mlp(x)
    mlp.remember(x, lam)
    assert mlp.recall(x) is lam and mlp.recall(x.clone()) is None
    with torch.no_grad():
        assert mlp.recall(x) is None
        mlp.fc2.bias.add_(1.0)
    assert mlp.recall(x) is None
    mlp.remember(x, lam)
    x.add_(0)  # an in-place change of the input
    assert mlp.recall(x) is None


def test_a_standalone_layer_keeps_no_lambda_between_forwards():
    layer = make_layer("sparsegen", 0.0, "x").eval()
    x = torch.randn(2, 5, D_IN)
    layer(x)
    assert layer.lambda_mlp.recall(x) is None


def test_a_learned_lambda_router_may_not_redefine_lam():
    """MoLELinear computes a learned λ from the λ-MLP itself (fused), so a router's own lam() would be ignored."""
    from ldmole import Router, register_router

    def lam(self, x, scores):
        return self.lambda_mlp(x) * 0.5

    with pytest.raises(ValueError, match="learned_lambda=True and redefines lam"):
        register_router(type("HalfLambda", (Router,), {"name": "test_half_lambda", "learned_lambda": True, "lam": lam}))


# ---- Without autograd (evaluation, generation): separate GEMMs, Sparsegen without its autograd Function, and
# for a few tokens the experts' update as a batched GEMM (no copy of B). The same outputs as with autograd.

TOKENS = {"decoding": (1, 1), "tokens": (2, 5)}  # 1 <= r tokens: the batched-GEMM update; 10 > r: one GEMM


@pytest.mark.parametrize("precision", ["float32", "autocast", "bf16 input"])
@pytest.mark.parametrize("shape", list(TOKENS))
@pytest.mark.parametrize("training, dropout, router_input", MODES)
@pytest.mark.parametrize("router, input_norm", [(router, "none") for router in ROUTERS] + [("sparsegen", "rms")])
def test_without_autograd_the_layer_gives_the_outputs_it_gives_with_autograd(router, input_norm, training, dropout,
                                                                             router_input, shape, precision):
    dtype = torch.bfloat16 if precision == "bf16 input" else torch.float32
    layer = make_layer(router, dropout, router_input, input_norm, dtype=dtype).train(training)
    x = torch.randn(*TOKENS[shape], D_IN).to(dtype)
    outputs = []
    for grad in (True, False):
        torch.manual_seed(7)  # the same dropout mask
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            outputs.append(layer(x.clone().requires_grad_(grad)).detach().float())
    with_grad, without = outputs
    assert without.shape == with_grad.shape == (*TOKENS[shape], D_OUT)
    tol = 1e-5 if precision == "float32" else 2e-2
    error = float((without - with_grad).abs().max() / with_grad.abs().max())
    assert error < tol, f"relative difference {error:.2e} without autograd"


def test_without_autograd_every_matrix_has_its_own_gemm_and_no_weight_is_copied():
    """Without a backward to share, concatenating W_g, W1 and A would only copy them (per call; costly when
    decoding one token): each runs alone, and nothing is concatenated."""
    layer = make_layer("sparsegen", 0.2, "x").eval()
    with torch.no_grad():
        assert linears_of(layer, torch.randn(2, 5, D_IN)) == [{"W_g"}, {"W1"}, {"W2"}, {"A"}]
        cats = []

        class CatLog(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.cat:
                    cats.append(func)
                return func(*args, **(kwargs or {}))

        with CatLog():
            layer(torch.randn(1, 1, D_IN))
    assert cats == []


def test_without_autograd_lambda_runs_once_per_distinct_input():
    model = get_mole_model(tiny_model("qwen3", num_layers=2),
                           MoLEConfig(router="sparsegen", num_experts=4, r=2, lambda_hidden=16)).eval()
    log = FirstLayerLog(model)
    with torch.no_grad(), log:
        model(input_ids=torch.randint(1, 96, (1, 1), generator=torch.Generator().manual_seed(0)))
    assert log.calls == [f"model.layers.{i}.{m}" for i in range(2)
                         for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


# ---- What a training forward keeps for its backward.

def saved_storages(layer: MoLELinear, x: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """(shape, storage bytes) of every tensor autograd saves in one training forward of ``layer``."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return saved


@pytest.mark.parametrize("router_input", ["x", "dropout"])
def test_a_training_forward_keeps_no_copy_of_b_no_concatenated_weight_and_no_whole_gemm_output(router_input):
    """The backward rebuilds B_cat and the concatenated [W_g; W1(; A)] from the parameters, and the scores and
    hidden units are copied out of the routing GEMM's output, so that none of these copies (each the size of
    a weight, or λ's H pre-activations per token) lives from the forward to the backward."""
    layer = make_layer("sparsegen", 0.2, router_input).train()
    hidden_width = layer.lambda_mlp.fc1.out_features
    tokens = 10
    saved = saved_storages(layer, torch.randn(2, 5, D_IN, requires_grad=True))
    shapes = {shape for shape, _ in saved}
    e_r = EXPERTS * RANK
    assert (D_OUT, e_r) not in shapes and (e_r, D_OUT) not in shapes, "a copy of B_cat is saved"
    for rows in (EXPERTS + hidden_width, EXPERTS + hidden_width + e_r):
        assert (rows, D_IN) not in shapes, "the concatenated routing weight is saved"
    gemm_output_bytes = {4 * tokens * (EXPERTS + hidden_width), 4 * tokens * (EXPERTS + hidden_width + e_r)}
    assert not any(nbytes in gemm_output_bytes for _, nbytes in saved), "the whole routing GEMM output is kept"
    assert (2, 5, EXPERTS, RANK) in shapes or (tokens, EXPERTS, RANK) in shapes  # h, which the update's backward needs
