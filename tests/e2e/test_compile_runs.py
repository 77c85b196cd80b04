"""Inductor against eager: a compiled MoLE layer's outputs, routing weights and gradients with dropout on, and a
tiny LD-MoLE run with ``compile=true`` against the same run in eager mode (the same logged losses at every step
and the same evaluation results, to float round-off)."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ldmole.core.compile import compile_mole_model
from ldmole.core.records import routing_records
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.trainer import train
from tests.helpers import tiny_run
from tests.unit.test_compile import make_layer

# 8 training examples in batches of 4: 2 optimiser steps per epoch, 2 epochs, every step logged.
TINY = ("method=ldmole", "train_max_examples=8", "eval_max_examples=8", "batch_size=4", "per_device_batch_size=4",
        "eval_batch_size=4", "log_every=1", "num_epochs=2", "save_epoch_adapters=[]", "mixed_precision=no",
        "sparsity_coef=0.1")


@pytest.mark.slow
def test_compiled_run_logs_the_eager_runs_losses(tmp_path):
    logs, metrics, graphs = {}, {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / ("compiled" if compiled else "eager")
        train(compose_config(tiny_run(*TINY, f"compile={str(compiled).lower()}", f"output_dir={out}")))
        graphs[compiled] = counters["stats"]["unique_graphs"]
        logs[compiled] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        metrics[compiled] = json.loads((out / "metrics.json").read_text())
    # graphs: layer 0 (input without grad) and the rest, in training and in evaluation; fewer than dynamo's
    # recompile limit (8), which would send further layers back to eager
    assert graphs[False] == 0 and 2 <= graphs[True] < 8, graphs
    eager, compiled = logs[False], logs[True]
    steps = [entry for entry in eager if "lr" in entry]
    assert len(steps) == 4 and [e["step"] for e in steps] == [e["step"] for e in compiled if "lr" in e]
    for ours, theirs in zip(eager, compiled):
        assert ours.keys() == theirs.keys()
        for key in ("task", "lb", "sparsity"):
            if key in ours:
                assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-6), (ours, theirs)
    assert metrics[True]["accuracy"] == metrics[False]["accuracy"]
    assert metrics[True]["routing"]["avg_active_experts"] == pytest.approx(
        metrics[False]["routing"]["avg_active_experts"], rel=1e-4)
    assert metrics[True]["routing"]["lambda"]["mean"] == pytest.approx(metrics[False]["routing"]["lambda"]["mean"],
                                                                       rel=1e-4)


@pytest.mark.slow
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
        grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
        results.append((out.detach(), xi.grad, grads, routing_records(layer)[0].weights.detach()))
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
