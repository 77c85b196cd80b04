"""Greedy generation from a MoLE model with a routing trace: per generated token, how many experts
each decoder layer activated and, for Sparsegen routers, its λ.

A generated token's routing is the routing of the forward that chose it, at the position that
predicted it: the last prompt position for the first token, then each decoding step (one new
position with the KV cache; its records' weights are ``[B, 1, E]``). Per layer, the active count
is averaged over the layer's adapted modules (q/k/v/o, gate/up/down) and λ over those that have one.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..core.records import RoutingRecord, routing_records
from .data.chat import ChatFormat, get_chat_format
from .data.features import encode_prompt, end_token_id

__all__ = ["generate_with_trace", "stop_token_ids", "format_trace_line"]


def stop_token_ids(tokenizer, chat_format: ChatFormat) -> list[int]:
    """Tokens that end a generated answer: the format's end marker (eos for ``plain``) and eos."""
    ids = [end_token_id(tokenizer, chat_format)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _last_position_routing(records: Sequence[RoutingRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """Active experts ``[M]`` and λ ``[M]`` (NaN without λ) of every module at the last position of
    the first sequence; device tensors, so a decoding step waits on nothing here."""
    active = torch.stack([(r.weights[0, -1] > 0).sum().float() for r in records])
    lam = torch.stack([r.lam[0, -1].float() if r.lam is not None else active.new_tensor(float("nan"))
                       for r in records])
    return active, lam


def _per_layer(layers: list[int], active: np.ndarray, lam: np.ndarray) -> dict[str, dict[str, float]]:
    """{layer: {active_experts, lambda_mean (only where some module has λ)}} of one token."""
    result: dict[str, dict[str, float]] = {}
    for layer in sorted(set(layers)):
        rows = [i for i, l in enumerate(layers) if l == layer]
        entry = {"active_experts": float(active[rows].mean())}
        lams = lam[rows][~np.isnan(lam[rows])]
        if len(lams):
            entry["lambda_mean"] = float(lams.mean())
        result[str(layer)] = entry
    return result


@torch.no_grad()
def generate_with_trace(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                        chat_format: Union[str, ChatFormat] = "plain",
                        stop_ids: Optional[Sequence[int]] = None) -> tuple[str, list[dict[str, Any]]]:
    """Greedy continuation of ``prompt`` (wrapped in ``chat_format``) and its per-token routing trace.

    Stops after ``max_new_tokens`` or at a token of ``stop_ids`` (default: :func:`stop_token_ids`;
    the stop token is generated and traced, and left out of the text). Each trace entry has
    ``token_id``, ``token`` (its text), ``active_experts`` (mean over all adapted modules) and
    ``layers`` (see :func:`_per_layer`); a model without routers (router lora) gives empty ``layers``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    fmt = get_chat_format(chat_format) if isinstance(chat_format, str) else chat_format
    stop = set(stop_token_ids(tokenizer, fmt) if stop_ids is None else stop_ids)
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(prompt, tokenizer, fmt)
    if not prompt_ids:
        raise ValueError("the prompt is empty and its chat format adds no tokens; pass some prompt text")
    ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    tokens, steps, layers, past, step_input = [], [], None, None, ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, attention_mask=mask, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1)
        records = routing_records(model)
        if records:
            layers = [r.layer_index for r in records] if layers is None else layers
            steps.append(_last_position_routing(records))
        tokens.append(token)
        if stop and int(token) in stop:  # the only per-token host sync, and only when there is a stop set
            break
        step_input = token[:, None]
        mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
    model.train(was_training)
    generated = torch.cat(tokens).tolist()
    trace = []
    # float64 on the host: per-layer means of small integer counts print as 10/7, not its float32 rounding
    active = torch.stack([a for a, _ in steps]).cpu().double().numpy() if steps else None
    lam = torch.stack([l for _, l in steps]).cpu().double().numpy() if steps else None
    for i, token_id in enumerate(generated):
        entry: dict[str, Any] = {"token_id": token_id, "token": tokenizer.decode([token_id])}
        entry["active_experts"] = float(active[i].mean()) if active is not None else None
        entry["layers"] = _per_layer(layers, active[i], lam[i]) if active is not None else {}
        trace.append(entry)
    kept = generated[:-1] if generated and generated[-1] in stop else generated
    return tokenizer.decode(kept), trace


def format_trace_line(index: int, entry: dict[str, Any]) -> str:
    """One printed line of a trace: step, token, active experts per layer and λ per layer (when present)."""
    layers = entry["layers"]
    line = f"{index:4d} {entry['token']!r:>14} active/layer " + " ".join(f"{v['active_experts']:.2f}"
                                                                         for v in layers.values())
    lams = [v["lambda_mean"] for v in layers.values() if "lambda_mean" in v]
    if lams:
        line += " | λ/layer " + " ".join(f"{v:.2f}" for v in lams)
    return line
