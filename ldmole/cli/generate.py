"""Greedy generation from a saved adapter, with an optional per-token routing trace.

    python -m ldmole.cli.generate PATH --prompt "Which gas do plants take in?" [--max-new-tokens 64]
        [--trace] [--trace-json FILE.json] [--device D] [--base-model M] [--tokenizer T]
        [--quantization none|nf4|fp4|int8]

PATH is a run folder (its adapter/) or an adapter folder. The prompt goes between the prefix and
suffix of the adapter's chat format (as a training prompt does), generation is greedy with the KV
cache and stops at the format's end marker / eos or after --max-new-tokens.

--trace prints one line per generated token: the token, the number of active experts per decoder
layer (averaged over the layer's adapted modules) and, for Sparsegen routers, λ per layer (mean
over those modules). A token's routing is that of the forward that chose it, at the position that
predicted it. --trace-json writes the trace: one entry per token with token_id, token,
active_experts (mean over all modules) and layers {layer: {active_experts, lambda_mean}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ldmole.experiment.adapter_info import AdapterInfo
from ldmole.experiment.data.task_kinds import task_kind_for_model
from ldmole.experiment.generation import format_trace_line, generate_with_trace
from ldmole.experiment.pretrained import adapter_folder, from_pretrained, load_adapter_tokenizer
from ldmole.experiment.quantization import QUANTIZATIONS
from ldmole.experiment.run_config import import_env_modules


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (adapter/ inside) or an adapter folder")
    parser.add_argument("--prompt", required=True, help="the user text (wrapped in the adapter's chat format)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trace", action="store_true", help="print active experts and λ per layer for every token")
    parser.add_argument("--trace-json", type=Path, default=None, help="write the per-token trace as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-model", default=None, help="another location of the base model (hub id or directory)")
    parser.add_argument("--tokenizer", default=None, help="replaces the adapter's tokenizer")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="load the base in 4-bit (nf4, fp4) or 8-bit (int8) with bitsandbytes, or unquantised "
                             "(none) (default: as the adapter was trained; docs/quantization.md)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import_env_modules()  # routers an adapter was trained with that a user module registers
        folder = adapter_folder(args.path)
        info = AdapterInfo.read(folder)
        if task_kind_for_model(info.model_kind).label_head:
            raise ValueError(f"the adapter (task {info.task}) has a {info.model_kind} head, which scores classes and "
                             "cannot generate; pass an adapter trained on a QA task")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
        tokenizer = load_adapter_tokenizer(folder, args.tokenizer)
        model = from_pretrained(folder, base_model=args.base_model, tokenizer=args.tokenizer,
                                quantization=args.quantization).to(args.device)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text, trace = generate_with_trace(model, tokenizer, args.prompt, args.max_new_tokens, info.chat_format)
    print(text)
    if args.trace:
        has_lambda = bool(trace) and any("lambda_mean" in v for v in trace[0]["layers"].values())
        print(f"\nrouting per generated token ({info.method}; active experts per layer"
              f"{', then λ per layer' if has_lambda else ''}):")
        if trace and not trace[0]["layers"]:
            print("  no routers (plain LoRA): one expert is always active")
        else:
            for index, entry in enumerate(trace):
                print(format_trace_line(index, entry))
    if args.trace_json is not None:
        args.trace_json.parent.mkdir(parents=True, exist_ok=True)
        args.trace_json.write_text(json.dumps({"adapter": str(folder), "method": info.method, "prompt": args.prompt,
                                               "chat_format": info.chat_format, "text": text, "tokens": trace},
                                              indent=2, ensure_ascii=False))
        print(f"wrote {args.trace_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
