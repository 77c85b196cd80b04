"""generate_with_trace on tiny random MoLE models: one trace entry per generated token, active expert
counts where the router puts them, λ only for Sparsegen, stopping, and the same tokens and routing
as full forwards without the KV cache."""

from __future__ import annotations

import string

import pytest
import torch

from ldmole import MoLEConfig, get_mole_model, mole_parameters, routing_records
from ldmole.experiment.generation import format_trace_line, generate_with_trace
from tests.helpers import tiny_model


class CharTokenizer:
    """A character tokenizer for the tiny models' 96-id vocabulary: id 3 is eos, characters are 5.."""

    CHARS = string.ascii_letters + string.digits + " .,?!\n"
    eos_token, eos_token_id, pad_token_id = "\x03", 3, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.eos_token_id if c == self.eos_token else 5 + self.CHARS.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.CHARS[i - 5] if 5 <= i < 5 + len(self.CHARS) else f"<{i}>" for i in ids)


TOKENIZER = CharTokenizer()


def mole_model(router: str, seed: int = 0, scale: float = 0.5, **settings):
    """A tiny 4-layer Qwen3 with adapters and routers perturbed by ``scale`` (so routing is not the initial one;
    large router scores can underflow a top-k softmax weight to exactly 0, so topk tests use small ones)."""
    model = get_mole_model(tiny_model("qwen3", seed=seed), MoLEConfig(router=router, r=4, **settings))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for param in mole_parameters(model).values():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


def test_topk_trace_has_one_entry_per_token_with_exactly_top_k_experts_and_no_lambda():
    model = mole_model("topk", scale=0.05, num_experts=4, top_k=2)
    text, trace = generate_with_trace(model, TOKENIZER, "Hello there?", max_new_tokens=6, stop_ids=())
    assert len(trace) == 6
    assert text == TOKENIZER.decode([entry["token_id"] for entry in trace])
    for entry in trace:
        assert set(entry["layers"]) == {"0", "1", "2", "3"}
        assert all(layer["active_experts"] == 2.0 for layer in entry["layers"].values())
        assert all("lambda_mean" not in layer for layer in entry["layers"].values())
        assert entry["active_experts"] == 2.0 and entry["token"] == TOKENIZER.decode([entry["token_id"]])


def test_sparsegen_trace_activates_at_least_one_expert_and_reports_lambda_per_layer():
    model = mole_model("sparsegen", num_experts=4)
    _, trace = generate_with_trace(model, TOKENIZER, "Hello there?", max_new_tokens=5, stop_ids=())
    assert len(trace) == 5
    for entry in trace:
        for layer in entry["layers"].values():
            assert 1.0 <= layer["active_experts"] <= 4.0
            assert layer["lambda_mean"] < 1.0
    assert "λ/layer" in format_trace_line(0, trace[0])
    counts = {layer["active_experts"] for entry in trace for layer in entry["layers"].values()}
    assert counts != {4.0}, "perturbed routers should not route every token to all experts"


def test_trace_matches_full_forwards_without_the_cache():
    """Token k and its routing are those of a forward over prompt + the k tokens before it, at its last position."""
    model = mole_model("sparsegen", seed=3, scale=0.2, num_experts=4)
    prompt = TOKENIZER.encode("Why?")
    _, trace = generate_with_trace(model, TOKENIZER, "Why?", max_new_tokens=5, stop_ids=())
    ids = list(prompt)
    for entry in trace:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        assert int(logits[0, -1].argmax()) == entry["token_id"]
        records = routing_records(model)
        for layer, got in entry["layers"].items():
            mine = [r for r in records if r.layer_index == int(layer)]
            active = sum(int((r.weights[0, -1] > 0).sum()) for r in mine) / len(mine)
            lam = sum(float(r.lam[0, -1]) for r in mine) / len(mine)
            assert got["active_experts"] == active
            assert got["lambda_mean"] == pytest.approx(lam, rel=1e-4, abs=1e-4)  # cache vs no-cache float noise
        ids.append(entry["token_id"])


def test_generation_stops_at_a_stop_token_which_is_traced_but_not_in_the_text():
    model = mole_model("topk", scale=0.05, num_experts=4, top_k=2)
    _, free = generate_with_trace(model, TOKENIZER, "Hi", max_new_tokens=4, stop_ids=())
    ids = [entry["token_id"] for entry in free]
    text, trace = generate_with_trace(model, TOKENIZER, "Hi", max_new_tokens=4, stop_ids=[ids[0]])
    assert [entry["token_id"] for entry in trace] == ids[:1] and text == ""
    later = [k for k in range(1, len(ids)) if ids[k] not in ids[:k]]  # a token first generated at step k
    if later:
        k = later[0]
        text, trace = generate_with_trace(model, TOKENIZER, "Hi", max_new_tokens=4, stop_ids=[ids[k]])
        assert [entry["token_id"] for entry in trace] == ids[: k + 1] and text == TOKENIZER.decode(ids[:k])


def test_plain_lora_trace_has_no_layers():
    model = mole_model("lora", num_experts=1)
    _, trace = generate_with_trace(model, TOKENIZER, "Hi", max_new_tokens=2, stop_ids=())
    assert len(trace) == 2 and all(entry["layers"] == {} and entry["active_experts"] is None for entry in trace)
