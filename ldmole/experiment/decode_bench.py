"""Greedy decoding with the KV cache: ms per generated token of the base model, LoRA r=64 and LD-MoLE
(``ldmole-bench-step --decode``).

Each variant is the causal LM that a QA run builds (``Run.base_model`` of the method's composed config, task
ARC-Easy), with the method's adapter injected by ``ldmole.get_mole_model`` (``base``: none; ``peft_lora_r64``:
PEFT), in eval mode, frozen base weights shared as in :mod:`.step_bench`. A prompt of ``decode_batch``
identical sequences (a CoLA sentence in the model's prompt format, or ``prompt_len`` random ids) is run once
(prefill, ``logits_to_keep=1``), then ``new_tokens`` single-token forwards with ``past_key_values`` (the HF
cache), each taking the argmax of the last logits as the next input, as ``ldmole-generate`` does (no stop
token, so every round generates exactly ``new_tokens``), under ``torch.no_grad``.

Time: the ``new_tokens`` decoding forwards of one round, with ``torch.cuda.synchronize`` before and after on
CUDA; ms/token = that time / ``new_tokens`` (one step yields ``decode_batch`` tokens). Rounds are round-robin
over the variants (order rotated), ``warmup`` untimed, median of ``steps``. The prefill is timed apart.
Memory: ``peak MB`` of one whole generation, defined as in :mod:`.step_bench` (CUDA allocator delta; on the
CPU, PyTorch's CPU allocator replayed from profiler events).

The adapters are as initialised (LoRA B = 0), so ``lora_r64`` generates the base model's tokens; the
generated ids of each variant's last round are in the JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from . import bench
from .data.chat import get_chat_format
from .data.features import encode_prompt
from .data.rows import load_split_rows
from .data.tasks import get_task
from .run import Run
from .step_bench import (BASE, DEFAULT_PROMPT_LEN, METHODS, REFERENCE, BenchContext, StepBenchSettings,
                         _error_text, _sync, bench_session, log_profiles, method_spec, profiled,
                         quiet_loading, resolved, with_adapter)

__all__ = ["run_decode_benchmark", "format_decode_table", "DECODE_TASK"]

DECODE_TASK = "arc_e"  # a QA task: its runs build the causal LM


class DecodeVariant:
    """One decoded model: its name, label, model and the last round's timings and tokens."""

    def __init__(self, name: str, label: str, model: nn.Module) -> None:
        self.name, self.label, self.model = name, label, model
        self.error: Optional[str] = None
        self.compiled: Optional[str] = None
        self.tokens: list[int] = []


def build_decode_variant(name: str, ctx: BenchContext) -> DecodeVariant:
    spec = METHODS[REFERENCE] if name == BASE else method_spec(name)
    config = ctx.config(spec, f"{name}/decode", task=DECODE_TASK)
    run = Run(config)
    model = run.base_model()
    model = ctx.adopt(model if name == BASE else with_adapter(model, spec, config), ctx.device)
    model.eval()
    if ctx.batch is None:
        ctx.batch = {"input_ids": _prompt(ctx, run, model)}
    return DecodeVariant(name, "base (no adapter)" if name == BASE else spec.label, model)


def _prompt(ctx: BenchContext, run: Run, model: nn.Module) -> torch.Tensor:
    """``[decode_batch, L]`` prompt ids: a CoLA sentence in the run's prompt format, or random ids."""
    s = ctx.settings
    if s.data == "cola":
        sentence = load_split_rows(get_task("cola"), "train", ctx.data_dir)[0]["sentence"]
        ids = encode_prompt(sentence, run.tokenizer, get_chat_format(run.config.backbone.chat_format))
        prompt = torch.tensor([ids])
    else:
        vocab = model.get_input_embeddings().num_embeddings
        prompt = torch.randint(0, vocab, (1, s.prompt_len or DEFAULT_PROMPT_LEN),
                               generator=torch.Generator().manual_seed(s.seed))
    return prompt.expand(s.decode_batch, -1).contiguous()


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, autocast: Callable,
             device: torch.device) -> tuple[float, float, list[int]]:
    """(prefill seconds, decoding seconds, generated ids of the first sequence): greedy, KV cache."""
    mask = torch.ones_like(prompt)
    _sync(device)
    start = time.perf_counter()
    with autocast():
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
    past, step_input = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    generated = [step_input]
    start = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with autocast():
            out = model(input_ids=step_input, attention_mask=mask, past_key_values=past, use_cache=True)
        past, step_input = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(step_input)
    _sync(device)
    decode = time.perf_counter() - start
    return prefill, decode, torch.cat(generated, dim=1)[0].tolist()


class _GenerationStepper:
    """One whole generation, for :func:`bench.cpu_peak_bytes` / :func:`bench.cuda_peak_bytes`."""

    def __init__(self, variant: DecodeVariant, ctx: BenchContext) -> None:
        self.variant, self.ctx = variant, ctx

    def zero(self) -> None:
        pass

    def __call__(self) -> None:
        generate(self.variant.model, self.ctx.batch_on(self.ctx.device)["input_ids"], self.ctx.settings.new_tokens,
                 self.ctx.autocast, self.ctx.device)


def run_decode_benchmark(settings: StepBenchSettings, log: Callable[[str], None] = print) -> dict:
    """Builds the decode variants, times them round-robin, measures memory; returns the JSON-able result."""
    settings = resolved(dataclasses.replace(settings, decode=True))
    import peft  # noqa: F401 - loaded before timing

    with bench_session(settings, log) as (ctx, env, limits):
        log("# Greedy decoding with the KV cache (ms per generated token)")
        log("")
        log(f"commit {env.get('commit') or 'unknown'}" + (" (working tree had uncommitted changes)"
                                                          if env.get("dirty") else "")
            + f"; torch {env['torch']}, transformers {env['transformers']}; device {env['device']}, dtype "
              f"{ctx.dtype_name}, torch threads {env['torch_num_threads']}")
        log("building the variants:")
        variants = []
        with quiet_loading():
            for name in settings.method_names():
                started = time.perf_counter()
                variants.append(build_decode_variant(name, ctx))
                log(f"  built {name} in {time.perf_counter() - started:.1f} s")
                gc.collect()
        prompt = ctx.batch_on(ctx.device)["input_ids"]
        log(f"prompt [{prompt.shape[0]}, {prompt.shape[1]}], {settings.new_tokens} new tokens; "
            f"{settings.warmup} warm-up + {settings.steps} timed rounds:")
        prefill: dict[str, list[float]] = {v.name: [] for v in variants}
        decode: dict[str, list[float]] = {v.name: [] for v in variants}
        for it in range(settings.warmup + settings.steps):
            live = [v for v in variants if v.error is None]
            if not live:
                break
            shift = it % len(live)
            for v in live[shift:] + live[:shift]:
                try:
                    p, d, v.tokens = generate(v.model, prompt, settings.new_tokens, ctx.autocast, ctx.device)
                except Exception as error:  # reported; the others go on
                    v.error = _error_text(error)
                    log(f"  {v.name}: generation failed: {v.error}")
                    continue
                if it >= settings.warmup:
                    prefill[v.name].append(p)
                    decode[v.name].append(d)
            log(f"  round {it + 1}/{settings.warmup + settings.steps} done")
        rows = []
        for v in variants:
            peak = None
            if v.error is None:
                stepper = _GenerationStepper(v, ctx)
                try:
                    peak = (bench.cuda_peak_bytes(stepper, ctx.device) if ctx.device.type == "cuda"
                            else bench.cpu_peak_bytes(stepper))
                except Exception as error:
                    v.error = f"memory run: {_error_text(error)}"
            t = decode[v.name]
            per_token = [1e3 * s / settings.new_tokens for s in t]
            median = statistics.median(per_token) if per_token else None
            rows.append(dict(method=v.name, label=v.label, ms_per_token=median,
                             min_ms_per_token=min(per_token) if per_token else None, times_ms_per_token=per_token,
                             tokens_per_s=settings.decode_batch * 1e3 / median if median else None,
                             prefill_ms=1e3 * statistics.median(prefill[v.name]) if prefill[v.name] else None,
                             peak_mb=peak / 2**20 if peak is not None else None, generated=v.tokens,
                             compile=v.compiled, error=v.error))
        profiles = {v.name: bench.profile_table(_GenerationStepper(v, ctx), ctx.device, settings.profile_rows)
                    for v in variants if v.error is None and profiled(settings.profile, v.name)}
        ref = next((r for r in rows if r["method"] == REFERENCE), None)
        for r in rows:
            r["ratio_vs_lora_r64"] = (r["ms_per_token"] / ref["ms_per_token"]
                                      if ref and ref["ms_per_token"] and r["ms_per_token"] else None)
        if hasattr(os, "getloadavg"):
            env["loadavg_end"] = list(os.getloadavg())
        setting = dict(model=settings.model, model_info=ctx.model_info, device=str(ctx.device), dtype=ctx.dtype_name,
                       compile=settings.compile, recompile_limits=limits, data=settings.data,
                       prompt_len=int(prompt.shape[1]), decode_batch=settings.decode_batch,
                       new_tokens=settings.new_tokens, methods=settings.method_names(), steps=settings.steps,
                       warmup=settings.warmup, seed=settings.seed, task=DECODE_TASK,
                       overrides={k: str(v) for k, v in settings.overrides.items()})
        result = dict(environment=env, setting=setting, reference=REFERENCE,
                      memory=dict(peak_mb=_decode_memory_note(ctx.device),
                                  shared_frozen_mb=ctx.frozen.total_bytes() / 2**20),
                      rows=rows, profiles=profiles)
        log("")
        log(format_decode_table(result))
        log_profiles(profiles, log, "generation")
        return result


def _decode_memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return ("peak MB: torch.cuda.max_memory_allocated during one generation (prefill + new tokens) minus "
                "memory_allocated before it: KV cache, activations, temporaries; not the weights")
    return ("peak MB: peak net bytes from PyTorch's CPU allocator during one generation (prefill + new tokens; "
            "torch.profiler memory events replayed): KV cache, activations, temporaries; not the weights; not what "
            "MKL/oneDNN allocate outside PyTorch; not RSS")


def format_decode_table(result: dict) -> str:
    s = result["setting"]
    info = s.get("model_info") or {}
    lines = [f"## decode, {s['model']}: {info.get('layers')} layers, prompt [{s['decode_batch']}, {s['prompt_len']}], "
             f"{s['new_tokens']} new tokens, {s['device']} {s['dtype']}, compile {'on' if s['compile'] else 'off'}, "
             f"median of {s['steps']} after {s['warmup']} warm-up",
             "",
             "| model | ms/token | min ms/token | tokens/s | ÷ lora r64 (ours) | prefill ms | peak MB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]

    def fmt(value, spec):
        return "" if value is None else f"{value:{spec}}"

    for r in result["rows"]:
        note = "; ".join(filter(None, [r["error"] and f"FAILED: {r['error']}", r.get("compile") or ""]))
        lines.append(f"| {r['label']} | {fmt(r['ms_per_token'], '.2f')} | {fmt(r['min_ms_per_token'], '.2f')} "
                     f"| {fmt(r['tokens_per_s'], '.1f')} | {fmt(r['ratio_vs_lora_r64'], '.2f')} "
                     f"| {fmt(r['prefill_ms'], '.1f')} | {fmt(r['peak_mb'], '.1f')} | {note} |")
    lines += ["", result["memory"]["peak_mb"]]
    return "\n".join(lines)
