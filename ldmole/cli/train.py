"""Fine-tune one MoLE adapter: ldmole-train model=... task=... method=... [key=value ...]

The same command as `python scripts/train.py ...` and `python -m ldmole.cli.train ...`; run.sh launches it.
Keys compose: defaults <- configs/models/<model>.yaml <- configs/methods/<method>.yaml <- key=value
(docs/config.md). imports=my_routers.py imports your module first, so its routers and tasks can be named."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from ldmole.experiment.run_config import available, compose_config, describe_keys, format_value


def usage() -> str:
    """The docstring, the model / task / method names and every key with its default and meaning."""
    from ldmole.experiment.data import TASKS

    lines = [__doc__, f"model:  {', '.join(available('models'))}", f"task:   {', '.join(TASKS)}",
             f"method: {', '.join(available('methods'))}", "",
             "Keys (default; model and method files may set their own values):"]
    for key, default, help_text in describe_keys():
        lines.append(f"  {key}={format_value(default)}\n      {help_text}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
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
        print(json.dumps({"accuracy": metrics.accuracy, "num_eval_examples": metrics.num_eval_examples,
                          "best_epoch": metrics.best_epoch,
                          "avg_active_experts": metrics.routing.get("avg_active_experts")}))
        print(f"outputs: {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
