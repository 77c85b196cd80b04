"""Precision: trained parameters stay float32 on a bf16 base; bf16 autocast matches float32 with a backward."""

from __future__ import annotations

import pytest
import torch

import ldmole
from ldmole import MoLEConfig, get_mole_model, load_mole, mole_parameters, routing_records, save_mole
from ldmole.core.injection import LAMBDA_MLPS_ATTR
from tests.helpers import tiny_model


def token_batch(lengths: list[int], vocab: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (never the pad id 0) of the given lengths and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, vocab, (length,), generator=gen)
        mask[row, :length] = 1
    return ids, mask


def bf16_classifier(family: str) -> torch.nn.Module:
    """A tiny bf16 sequence classifier with MoLE (softmax router) injected."""
    model = tiny_model(family, task="seq_cls", num_layers=2).to(torch.bfloat16)
    return get_mole_model(model, MoLEConfig(router="softmax", num_experts=2, r=4, alpha=8, dropout=0.0))


def test_trained_head_is_float32_and_frozen_base_keeps_bf16(family):
    model = bf16_classifier(family)
    for name, param in model.named_parameters():
        expected = torch.float32 if param.requires_grad else torch.bfloat16
        assert param.dtype == expected, f"{name}: expected {expected} (trained: {param.requires_grad}), got {param.dtype}"
    assert model.score.weight.requires_grad, "the classification head must be trained"


def test_adamw_step_at_small_lr_changes_a_bf16_models_head(family):
    model = bf16_classifier(family)
    model.train()
    ids, mask = token_batch([7, 5, 9, 4])
    before = model.score.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    optimizer.step()
    changed = (model.score.weight != before).float().mean().item()
    assert changed > 0.9, f"an AdamW step at lr 1e-5 must change (almost) every head weight; it changed {changed:.0%}"


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_model_with_float32_head_runs_and_returns_base_dtype_logits(family, autocast):
    model = bf16_classifier(family)
    ids, mask = token_batch([6, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16, f"expected bf16 logits like the stock bf16 model, got {logits.dtype}"
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_float32_head_round_trips_through_save_and_load(family, tmp_path):
    model = bf16_classifier(family)
    ids, mask = token_batch([6, 3, 8])
    with torch.no_grad():
        for param in mole_parameters(model).values():
            param.add_(torch.randn_like(param) * 1e-3)
        expected = model(input_ids=ids, attention_mask=mask).logits
    save_mole(model, tmp_path / "adapter")
    fresh = load_mole(tiny_model(family, task="seq_cls", num_layers=2).to(torch.bfloat16), tmp_path / "adapter")
    assert fresh.score.weight.dtype == torch.float32
    torch.testing.assert_close(fresh.score.weight, model.score.weight, atol=0, rtol=0,
                               msg="the float32 head must be saved and loaded without rounding")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| in float32."""
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


# topk is left out: its hard selection flips on near-ties, so bf16 rounding may change a token's experts.
@pytest.mark.parametrize("router", ["sparsegen", "softmax", "lora"])
def test_bf16_autocast_matches_float32_outputs_and_adapter_gradients(family, router):
    config = MoLEConfig(router=router, num_experts=1 if router == "lora" else 4, r=4, alpha=8, dropout=0.0,
                        lambda_hidden=16, lambda_bias_init=0.5)
    reference = get_mole_model(tiny_model(family, num_layers=2, seed=1), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in mole_parameters(reference).values():
            param.normal_(0, 0.05)
    low = get_mole_model(tiny_model(family, num_layers=2, seed=1).to(torch.bfloat16), config)
    with torch.no_grad():
        for name, param in mole_parameters(low).items():
            param.copy_(mole_parameters(reference)[name])
    assert all(p.dtype == torch.float32 for p in mole_parameters(low).values()), "adapter params must be float32"
    ids, mask = token_batch([9, 6, 8], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for name, model, autocast in (("fp32", reference, False), ("bf16", low, True)):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        records = routing_records(model)
        for record in records:
            assert record.scores.dtype == torch.float32 and record.weights.dtype == torch.float32, (
                f"{name} {record.name}: routing must be float32, got {record.scores.dtype}/{record.weights.dtype}")
        loss = out.loss + ldmole.load_balance_loss(records)
        loss.backward()
        results[name] = (out.logits.detach(), {n: p.grad for n, p in mole_parameters(model).items()})
    (logits32, grads32), (logits16, grads16) = results["fp32"], results["bf16"]
    assert relative_error(logits16, logits32) < 0.02, "bf16 logits must stay within 2% of float32"
    # Expert gradients agree per tensor; router and λ-MLP gradients (products of small bf16 terms) are
    # compared over all layers together, where their bf16 noise averages out.
    groups: dict[str, list[str]] = {}
    for name in grads32:
        kind = next((k for k in ("lora_A", "lora_B", "router", LAMBDA_MLPS_ATTR) if k in name), name)
        groups.setdefault(kind, []).append(name)
        assert grads16[name] is not None, f"{name} got no gradient under bf16 autocast"
        if kind in ("lora_A", "lora_B"):
            error = relative_error(grads16[name], grads32[name])
            assert error < 0.05, f"{name}: bf16 gradient differs from float32 by {error:.1%} (expected < 5%)"
    for kind, names in groups.items():
        error = relative_error(torch.cat([grads16[n].flatten() for n in names]),
                               torch.cat([grads32[n].flatten() for n in names]))
        assert error < 0.15, f"{kind} gradients: bf16 differs from float32 by {error:.1%} (expected < 15%)"
