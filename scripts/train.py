"""Fine-tune one MoLE adapter: python scripts/train.py model=... task=... method=... [key=value ...]."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmole.run_config import compose_config  # noqa: E402


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__ + "\nKeys and defaults: configs/defaults.yaml; names: configs/{models,tasks,methods}/.")
        return 0
    try:
        config = compose_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ldmole.trainer import NonFiniteLossError, train

    try:
        metrics = train(config)
    except (ValueError, OSError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: metrics[k] for k in ("accuracy", "num_eval_examples", "best_epoch") if k in metrics}
        summary["avg_active_experts"] = metrics.get("routing", {}).get("avg_active_experts")
        print(json.dumps(summary))
        print(f"outputs: {config['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
