"""ldmole/routing_plots.py on synthetic routing, and ldmole-plot-routing on a tiny saved run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldmole import RoutingRecord
from ldmole.experiment.routing_stats import RoutingStats
from ldmole.report import routing_plots as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000, f"{path} should be a non-empty PNG"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"


def record(layer: int, module_type: str, weights: torch.Tensor, lam=None, router="sparsegen") -> RoutingRecord:
    return RoutingRecord(f"model.layers.{layer}.{module_type}", layer, module_type, router, weights, weights,
                         lam, None)


def synthetic_routing(num_layers=3, experts=(4, 4, 6), router="sparsegen", seed=0) -> RoutingStats:
    """Two batches of 2 sequences (lengths 5+3, then 4+4) with sparse random weights."""
    generator = torch.Generator().manual_seed(seed)
    routing = RoutingStats(keep_tokens=True)
    batches = [torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])]
    for mask in batches:
        records = []
        for layer in range(num_layers):
            for module_type in ("q_proj", "down_proj"):
                raw = torch.rand(*mask.shape, experts[layer], generator=generator)
                weights = torch.where(raw > 0.5, raw, torch.zeros_like(raw))
                lam = torch.rand(*mask.shape, generator=generator) - 1 if router == "sparsegen" else None
                records.append(record(layer, module_type, weights, lam, router))
        input_ids = torch.randint(0, 50, mask.shape, generator=generator)
        routing.update(records, input_ids, mask)
    return routing


def test_token_routing_keeps_real_tokens_in_example_order():
    routing = synthetic_routing()
    assert routing.example_lengths == [5, 3, 4, 4]
    assert len(routing.token_ids) == 16 and routing.active((0, "q_proj")).shape == (16,)
    assert routing.example_slice(1) == slice(5, 8) and routing.example_slice(3) == slice(12, 16)
    assert routing.modules == [(0, "q_proj"), (0, "down_proj"), (1, "q_proj"), (1, "down_proj"), (2, "q_proj"),
                               (2, "down_proj")], "modules sort by layer, then q, k, v, o, gate, up, down"
    weights = routing.weights((2, "q_proj"))
    assert weights.shape == (16, 6)
    np.testing.assert_array_equal(routing.active((2, "q_proj")), (weights > 0).sum(1))
    with pytest.raises(IndexError):
        routing.example_slice(4)


def test_kept_tokens_agree_with_the_device_sums_of_the_same_accumulator():
    routing = synthetic_routing()
    for key, counts in routing.activation_counts.items():
        weights = routing.weights(key)
        np.testing.assert_array_equal(counts, (weights > 0).sum(0))
    summary = routing.summary()
    active = routing.active((1, "down_proj"))
    assert summary["per_module"]["model.layers.1.down_proj"]["avg_active_experts"] == pytest.approx(active.mean())


def test_per_token_routing_needs_keep_tokens_and_the_batch():
    weights = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    plain = RoutingStats()
    plain.update([record(0, "q_proj", weights)])
    assert plain.modules == [(0, "q_proj")] and plain.summary()["avg_active_experts"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="keep_tokens=True"):
        plain.active((0, "q_proj"))
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        RoutingStats(keep_tokens=True).update([record(0, "q_proj", weights)])


def test_summaries_of_active_counts_lambda_and_share():
    routing = synthetic_routing()
    bands = rp.active_expert_bands(routing)
    assert set(bands) == {"q_proj", "down_proj"} and bands["q_proj"]["layer"] == [0, 1, 2]
    active = routing.active((1, "down_proj"))
    assert bands["down_proj"]["mean"][1] == pytest.approx(active.mean())
    assert bands["down_proj"]["low"][1] <= bands["down_proj"]["mean"][1] <= bands["down_proj"]["high"][1]
    lams = rp.lambda_by_layer(routing)
    assert sorted(lams) == [0, 1, 2] and lams[0].shape == (32,), "λ pools both module types of a layer"
    share = rp.expert_share_by_layer(routing)
    assert share.shape == (3, 6)
    assert np.isnan(share[0, 4:]).all() and not np.isnan(share[2]).any(), "layers with fewer experts pad with NaN"
    np.testing.assert_allclose(np.nansum(share, axis=1), 1.0)
    np.testing.assert_allclose(np.nansum(rp.expert_share_by_layer(routing, "weight"), axis=1), 1.0)
    rates = rp.zero_activation_by_layer(routing)
    assert rates["q_proj"]["rate"][0] == pytest.approx((routing.active((0, "q_proj")) == 0).mean())
    per_token = rp.mean_active_per_token(routing)
    assert list(per_token)[0] == "all modules" and per_token["all modules"].shape == (16,)


def test_frequency_buckets_are_decades_with_unseen_first():
    bucket, labels = rp.frequency_buckets(np.array([0, 1, 9, 10, 99, 100, 5000]))
    assert labels == ["0", "1–9", "10–99", "100–999", "1k–<10k"]
    assert bucket.tolist() == [0, 1, 1, 2, 2, 3, 4]


def test_token_label_escapes_whitespace_and_dollars():
    assert rp.token_label(" the\n") == "·the\\n" and rp.token_label("$$") == r"\$\$"


def test_each_plot_function_writes_a_png_from_plain_data(tmp_path):
    layers = [0, 1, 2, 3]
    bands = {name: {"layer": layers, "mean": [3.0, 2.5, 2.0, 1.5], "low": [2, 2, 1, 1], "high": [4, 3, 3, 2]}
             for name in ("q_proj", "v_proj", "up_proj", "down_proj")}
    assert_png(rp.plot_active_experts_per_layer(bands, tmp_path / "active.png", max_experts=8))
    rng = np.random.default_rng(0)
    assert_png(rp.plot_lambda_per_layer({layer: rng.normal(-1, 0.3, 200) for layer in layers}, tmp_path / "lambda.png"))
    assert_png(rp.plot_lambda_per_layer({0: np.full(10, -1.59)}, tmp_path / "lambda_constant.png"))
    frequencies = rng.integers(0, 5000, 300)
    active = {"all modules": rng.uniform(1, 8, 300), "q_proj": rng.uniform(1, 8, 300)}
    assert_png(rp.plot_active_vs_token_frequency(frequencies, active, tmp_path / "freq.png"))
    share = rng.dirichlet(np.ones(8), size=4)
    share_2468 = share.copy()
    share_2468[0, 2:] = np.nan
    assert_png(rp.plot_expert_share({"after epoch 1": share_2468, "final": share}, tmp_path / "share.png"))
    assert_png(rp.plot_expert_share({"final": share}, tmp_path / "share_single.png"))
    assert_png(rp.plot_zero_activation_rate({"q_proj": {"layer": layers, "rate": [0.1, 0.05, 0.0, 0.2]}},
                                            tmp_path / "zero.png"))
    weights = np.where(rng.random((12, 8)) > 0.6, rng.random((12, 8)), 0.0)
    tokens = [rp.token_label(t) for t in ["<|im_start|>", "user", "\n", " Which", " is", "$", "?"] + ["x"] * 5]
    assert_png(rp.plot_token_routing(tokens, weights, tmp_path / "tokens.png", lam=rng.normal(-1, 0.2, 12)))
    assert_png(rp.plot_token_routing(tokens, weights, tmp_path / "tokens_no_lambda.png"))
    with pytest.raises(ValueError, match="token labels"):
        rp.plot_token_routing(tokens[:3], weights, tmp_path / "bad.png")


def test_routing_summary_numbers_match_the_per_token_arrays():
    routing = synthetic_routing()
    frequencies = np.array([0, 5, 50, 5, 0, 500, 5, 5, 50, 50, 0, 0, 5, 5, 5, 5])
    summary = rp.routing_summary(routing, frequencies)
    every = np.concatenate([routing.active(key) for key in routing.modules])
    assert summary["num_tokens"] == 16 and summary["num_examples"] == 4 and summary["router"] == "sparsegen"
    assert summary["active_experts"]["mean"] == pytest.approx(every.mean())
    assert summary["active_experts"]["min"] == every.min()
    layer2 = np.concatenate([routing.active((2, "q_proj")), routing.active((2, "down_proj"))])
    assert summary["active_experts"]["per_layer"]["2"]["mean"] == pytest.approx(layer2.mean())
    assert summary["zero_activation_rate"]["overall"] == pytest.approx((every == 0).mean())
    assert summary["zero_activation_rate"]["per_layer"]["2"] == pytest.approx((layer2 == 0).mean())
    lam1 = np.concatenate([routing.lam((1, "q_proj")), routing.lam((1, "down_proj"))])
    per_layer = summary["lambda"]["per_layer"]["1"]
    assert per_layer["q05"] == pytest.approx(np.quantile(lam1, 0.05))
    assert per_layer["spread"] == pytest.approx(np.quantile(lam1, 0.95) - np.quantile(lam1, 0.05))
    rows = {row["occurrences"]: row for row in summary["active_by_token_frequency"]}
    assert sum(row["tokens"] for row in rows.values()) == 16
    assert rows["1–9"]["tokens"] == 8 and rows["0"]["tokens"] == 4
    per_token = rp.mean_active_per_token(routing)["all modules"]
    assert rows["10–99"]["mean"] == pytest.approx(per_token[frequencies == 50].mean())
    json.dumps(summary)  # plain data


def test_routing_summary_has_no_lambda_for_routers_without_one():
    summary = rp.routing_summary(synthetic_routing(router="relu"))
    assert summary["lambda"] is None and "active_by_token_frequency" not in summary
