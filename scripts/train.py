#!/usr/bin/env python
"""Fine-tune one MoLE adapter from the shell: the same command as ``ldmole-train`` (``ldmole.cli.train.main``).

    python scripts/train.py model=tiny_qwen3 task=arc_c method=ldmole max_steps=20 [key=value ...]
    python scripts/train.py --help          # every key with its default and meaning

run.sh and ldmole-sweep launch the same function; docs/config.md lists the keys.
"""

import sys
from pathlib import Path

# The repository root, so that the script also runs from a clone where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmole.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
