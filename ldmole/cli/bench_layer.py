#!/usr/bin/env python
"""Forward+backward time and peak memory of one ``ldmole.MoLELinear`` against two baselines.

Usage (from the repo root):

    ldmole-bench-layer                                  # CPU, float32, Qwen3-1.7B shapes
    ldmole-bench-layer --device auto --dtype bfloat16 --json bench.json
    ldmole-bench-layer --shapes 2048x6144 --tokens 512 --experts 8 --rank 8 --iters 20
    ldmole-bench-layer --shapes 2048x6144 --routers sparsegen --profile "ldmole sparsegen"

The variants (ldmole per router, the reference release's dense-einsum formulation, PEFT LoRA of rank
E·r, the base linear alone), the timing protocol and what the memory columns mean are described in
:mod:`ldmole.experiment.bench`, which does the measuring; this command parses the options, prints the
tables and the goal ratios on 2048x6144, and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ldmole.experiment import bench
from ldmole.experiment.bench import DEFAULT_SHAPES, ROUTERS, BenchSettings


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``--shapes``: comma-separated D_INxD_OUT."""
    try:
        return bench.parse_shapes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_routers(text: str) -> list[str]:
    """``--routers``: comma-separated router names (the built-in routers and lora)."""
    routers = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown or not routers:
        raise argparse.ArgumentTypeError(f"unknown routers {unknown}; choose from {','.join(ROUTERS)}")
    return routers


def build_parser() -> argparse.ArgumentParser:
    d = BenchSettings()
    p = argparse.ArgumentParser(description="Forward+backward time and peak memory of ldmole.MoLELinear vs the "
                                            "reference dense-einsum formulation and a PEFT LoRA of rank E·r.")
    p.add_argument("--shapes", type=parse_shapes, default=d.shapes,
                   help=f"comma-separated D_INxD_OUT projection shapes (default {DEFAULT_SHAPES}: Qwen3-1.7B)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="T: x is [1, T, d_in] (default 512)")
    p.add_argument("--experts", type=int, default=d.experts, help="E, experts per layer (default 8)")
    p.add_argument("--rank", type=int, default=d.rank,
                   help="r, rank of each expert (default 8); LoRA baselines use E·r")
    p.add_argument("--iters", type=int, default=d.iters, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds first (default 2)")
    p.add_argument("--device", default=d.device, help="cpu (default), cuda, cuda:N, or auto (cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="float32 (default) or bfloat16 (base weight and x bf16, autocast, fp32 adapters)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--routers", type=parse_routers, default=d.routers,
                   help=f"comma-separated ldmole routers (default {','.join(ROUTERS)}); the PEFT LoRA and the "
                        "base-only rows are always measured")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="LoRA alpha per expert (default 16); the rank-E·r LoRAs use E·alpha (same scaling)")
    p.add_argument("--dropout", type=float, default=d.dropout,
                   help="LoRA dropout of every adapter, train mode (default 0.1)")
    p.add_argument("--lambda-hidden", type=int, default=d.lambda_hidden,
                   help="hidden width of the λ-MLP (default 256)")
    p.add_argument("--fixed-lambda", type=float, default=d.fixed_lambda, help="λ of sparsegen_fixed (default: the reference release's untrained constant, -1.589)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="k of the topk router (default 2)")
    p.add_argument("--loss", choices=("grad", "square"), default=d.loss,
                   help="grad: backward of sum(out * g), fixed random g (default); square: out.float().pow(2).mean()")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--profile", default=d.profile, metavar="VARIANTS",
                   help="after timing, print a torch.profiler op table of one step of these variants (comma-separated "
                        "names as in the table, e.g. 'ldmole sparsegen,peft lora (rank E·r)', or 'all')")
    p.add_argument("--profile-rows", type=int, default=d.profile_rows, help="rows of each --profile table (default 15)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    return p


def settings_of(args: argparse.Namespace) -> BenchSettings:
    """The parsed options as ``BenchSettings`` (every option but ``--json``)."""
    return BenchSettings(**{name: value for name, value in vars(args).items() if name != "json"})


def main(argv: Optional[list[str]] = None) -> int:
    """Parses arguments, runs the benchmark, prints tables; returns the exit status.

    JSON (``--json OUT``): ``{"environment", "setting", "shapes": [{"shape", "d_in", "d_out", "rows": [{"variant",
    "family", "router", "median_ms", "min_ms", "times_ms", "adapter_ms", "ratio_vs_peft", "speedup_vs_dense",
    "peak_mb", "saved_mb", "trainable_params"}]}], "goals": {router: {...}}}``.
    """
    args = build_parser().parse_args(argv)
    settings = settings_of(args)
    try:
        bench.check_settings(settings)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    result = bench.run_benchmark(settings)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
