#!/usr/bin/env python
"""Whole training steps (forward, routing losses, backward, AdamW step) of every method, through the
trainer and through the library alone; or, with ``--decode``, greedy decoding with the KV cache.

Usage (from the repo root):

    ldmole-bench-step                                            # SmolLM2-135M, CoLA batch of 16, both paths
    ldmole-bench-step --model qwen3_1.7b_widths --layers 2       # random weights of Qwen3-1.7B's widths
    ldmole-bench-step --model qwen3_1.7b_widths --device cuda --dtype bfloat16 --data random \\
        --batch 16 --seq-len 256 --compile --json step.json       # all 28 layers on a GPU
    ldmole-bench-step --methods lora_r64,ldmole --paths trainer quantization=...   # KEY=VALUE: config keys
    ldmole-bench-step --decode --new-tokens 32                   # base vs LoRA r=64 vs LD-MoLE, ms per token

What each path runs, the timing protocol and what the memory columns measure are described in
:mod:`ldmole.experiment.step_bench` (and :mod:`ldmole.experiment.decode_bench`), which do the measuring;
this command parses the options, prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ldmole.experiment.run_config import parse_overrides
from ldmole.experiment.step_bench import (DECODE_METHODS, DEFAULT_METHODS, METHODS, PATHS, WIDTH_PRESETS,
                                          StepBenchSettings)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    d = StepBenchSettings()
    p = argparse.ArgumentParser(
        description="Times whole training steps of every method through the trainer and through the library API "
                    "(or, with --decode, greedy decoding with the KV cache); prints ms/step, tokens/s, the ratio to "
                    "LoRA r=64 (ours) and peak memory.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config keys applied to every method's composed config (as ldmole-train takes them)")
    p.add_argument("--model", default=d.model,
                   help=f"smollm2_135m (default, real weights, offline), {', '.join(WIDTH_PRESETS)} (random weights "
                        "of that model's widths), or any configs/models file")
    p.add_argument("--layers", type=int, default=d.layers,
                   help="decoder layers of a random model (default: 2 on the CPU, all of them on CUDA)")
    p.add_argument("--device", default=d.device, help="auto (default: cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="base weights and autocast (default: bfloat16 on CUDA, float32 on the CPU); adapters float32")
    p.add_argument("--compile", action="store_true",
                   help="compile: the config's compile key when OptimConfig has one, else nn.Module.compile()")
    p.add_argument("--data", choices=("cola", "random"), default=d.data,
                   help="cola (default): --batch CoLA training sentences; random: random token ids [batch, seq-len]")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="length of --data random batches (default 256)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per step (default 16)")
    p.add_argument("--methods", type=_names, default=None,
                   help=f"comma-separated (default {','.join(DEFAULT_METHODS)}; with --decode "
                        f"{','.join(DECODE_METHODS)}); also any configs/methods file; 'base' with --decode")
    p.add_argument("--paths", type=_names, default=d.paths,
                   help=f"comma-separated code paths (default {','.join(PATHS)}); peft_lora_r64 is library only")
    p.add_argument("--steps", type=int, default=d.steps, help="timed rounds (default 3 on the CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed rounds first (default 1 on the CPU, 3 on CUDA; 3 with --compile)")
    p.add_argument("--data-dir", default=d.data_dir,
                   help="data folder with glue_cola/ and tokenizers/ (default $LDMOLE_DATA_DIR, else the test fixture)")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer folder (default: the model's own; <data-dir>/tokenizers/<family> for random models)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-share-weights", dest="share_weights", action="store_false",
                   help="give every variant its own copy of the frozen base weights (default: one shared copy)")
    p.add_argument("--work-dir", default=d.work_dir, help="where the random model's template is saved (temporary)")
    p.add_argument("--decode", action="store_true", help="greedy decoding with the KV cache instead of training steps")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="--decode: tokens generated per round (32)")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len,
                   help="--decode --data random: prompt length (default 32)")
    p.add_argument("--decode-batch", type=int, default=d.decode_batch,
                   help="--decode: sequences generated together (default 1)")
    p.add_argument("--profile", type=_names, default=d.profile, metavar="METHODS",
                   help="comma-separated methods (or method/path) whose torch.profiler op table (self time) of one "
                        "more step, or with --decode one more generation, is printed after the table")
    p.add_argument("--saved", type=_names, default=d.saved, metavar="METHODS",
                   help="comma-separated methods (or method/path) whose tensors saved for the backward in one more "
                        "step are listed, by module and shape (what a step's activation memory is)")
    p.add_argument("--profile-rows", type=int, default=d.profile_rows,
                   help="rows of each --profile / --saved table (default 25)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    return p


def settings_of(args: argparse.Namespace) -> StepBenchSettings:
    """The parsed options as ``StepBenchSettings`` (ValueError naming a malformed KEY=VALUE)."""
    values = {k: v for k, v in vars(args).items() if k not in ("json", "overrides")}
    return StepBenchSettings(**values, overrides=parse_overrides(args.overrides))


def main(argv: Optional[list[str]] = None) -> int:
    """Parses arguments, runs the benchmark, prints the table; returns the exit status (2: bad options,
    1: some variant failed, 0: all measured).

    JSON (``--json OUT``): ``{"environment" (versions, device, commit, dirty), "setting", "reference":
    "lora_r64", "memory" (what each memory column measures), "rows": [{"method", "label", "path", "median_ms",
    "min_ms", "times_ms", "tokens_per_s", "ratio_vs_lora_r64", "trainer_over_library", "peak_mb", "state_mb",
    "trainable_params", "params_changed" (fraction of trainable tensors that changed over the run), "lora_b_moved"
    (fraction of the zero-initialised lora_B tensors that a gradient step moved), "compile", "timed_compiles",
    "notes", "error"}], "profiles": {variant: --profile table}, "saved_tensors": {variant: [{"module", "shape",
    "mb", "tensors"}]}}``; with ``--decode`` the rows are
    ``{"method", "label", "ms_per_token", "min_ms_per_token", "times_ms_per_token", "tokens_per_s",
    "ratio_vs_lora_r64", "prefill_ms", "peak_mb", "generated", "compile", "error"}``.
    """
    args = build_parser().parse_args(argv)
    from ldmole.experiment import decode_bench, step_bench

    try:
        settings = settings_of(args)
        step_bench.check_settings(settings)
        unknown = [m for m in settings.method_names() if m not in METHODS and m != "base"]
        if unknown:
            print(f"note: {', '.join(unknown)} run as configs/methods files", file=sys.stderr)
        runner = decode_bench.run_decode_benchmark if settings.decode else step_bench.run_step_benchmark
        result = runner(settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nJSON written to {args.json}")
    return 1 if any(row["error"] for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
