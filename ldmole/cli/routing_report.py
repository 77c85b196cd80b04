#!/usr/bin/env python
"""Markdown tables comparing the routing of runs, from ldmole-plot-routing's routing_summary.json.

    ldmole-routing-report runs/smollm2_135m/cola/ldmole/seed42 runs/smollm2_135m/cola/ldmole_reference/seed42 \\
        [--layers 0,5,10,15,20,25,29] [--out report.md] [--lambda-figure lambda.png]

A run folder contributes its plots_init/ (before training, `ldmole-plot-routing RUN --at-init`) and
plots/ (trained) summaries, and without plots/ the routing statistics of its metrics.json (no
fewest-active count, no token-frequency rows); a routing_summary.json (or a folder holding one) is
read as is. Prints an overview, a per-layer table (λ q05–q95, active experts) and active experts by
token frequency; --lambda-figure also draws every summary's λ per layer (median and 5–95% band) in
one PNG. Tables: ldmole/report/routing_report.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ldmole.report.routing_report import (find_summaries, lambda_bands, overview_markdown, per_layer_markdown,
                                          token_frequency_markdown)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, routing_summary.json files or their folders")
    parser.add_argument("--layers", default=None, help="comma-separated layers of the per-layer table (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown to this file")
    parser.add_argument("--lambda-figure", type=Path, default=None,
                        help="also draw λ per layer of every summary that has one into this PNG")
    args = parser.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        summaries = find_summaries(args.paths)
    except ValueError as error:
        print(f"error: --layers {args.layers!r}: {error}; give comma-separated layer numbers", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = "\n".join([
        "#### Overview", "", overview_markdown(summaries),
        "#### Per layer", "", per_layer_markdown(summaries, layers),
        "#### Active experts by token frequency", "", token_frequency_markdown(summaries),
    ])
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.lambda_figure:
        from ldmole.report.routing_plots import plot_lambda_bands

        try:
            plot_lambda_bands(lambda_bands(summaries), args.lambda_figure)
        except ValueError as error:
            print(f"error: --lambda-figure: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
