"""Fine-tune one MoLE adapter: ldmole-train model=... task=... method=... [key=value ...]."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from ldmole.experiment.run_config import compose_config


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__ + "\nKeys and defaults: configs/defaults.yaml; names: configs/{models,tasks,methods}/.")
        return 0
    try:
        config = compose_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ldmole.experiment.trainer import NonFiniteLossError, train

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
    sys.exit(main())
