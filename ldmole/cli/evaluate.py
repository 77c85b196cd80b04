"""Scores a saved adapter on a task and split, without training: accuracy and the task metrics, answer
counts, and routing statistics (the same as metrics.json's).

    python -m ldmole.cli.evaluate PATH [--task T] [--split evaluation] [--max-examples N]
        [--batch-size B] [--device D] [--data-dir D] [--tokenizer T] [--base-model M]
        [--mixed-precision no|bf16|fp16] [--quantization none|nf4|fp4|int8] [--out FILE.json [--force]]

PATH is a run folder (config.yaml, adapter/, metrics.json) or an adapter folder (adapter_info.json).
A run's settings (config.yaml: protocol, selection_size, seed, max_length, eval_max_examples,
eval_batch_size, mixed_precision) are the defaults, also for an adapter folder inside a run, so on
the run's own task and split this reproduces metrics.json exactly (and says so). An adapter folder
alone gets the defaults of a run (protocol "selection", every example of the split).

--split (default evaluation):
  evaluation   the split the run reports on (its metrics.json accuracy): the task's validation split
               (MMLU-Pro: its test carve; protocol "reference": validation); needs no training data,
               so evaluation-only tasks such as HellaSwag work
  selection    the split the run picked its best epoch on (carved from train under "selection")
  NAME         any source split of the task, whole (train, validation, test; MMLU-Pro: its carves)

--max-examples N scores the first N (0 = all); by default the run's eval_max_examples on the run's
own task and evaluation/selection split, else all. --task scores another task of the same kind
(QA adapters on any QA task; a classification head on tasks with as many labels).

--out FILE writes the result as JSON (atomically); an existing FILE (a run's metrics.json, say) is
refused unless --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from ldmole.core.adapter_io import atomic_write
from ldmole.experiment.adapter_info import INFO_NAME, AdapterInfo
from ldmole.experiment.data import TASKS, TaskSpec, get_task
from ldmole.experiment.data.task_kinds import TASK_KINDS
from ldmole.experiment.evaluation import evaluate_routing
from ldmole.experiment.precision import MIXED_PRECISIONS, autocast_for
from ldmole.experiment.metrics import METRICS_NAME, RunMetrics
from ldmole.experiment.pretrained import RUN_ADAPTER, from_pretrained
from ldmole.experiment.quantization import QUANTIZATIONS, quantization_of
from ldmole.experiment.routing_stats import RoutingStats
from ldmole.experiment.run import PROTOCOL_SPLITS, Run
from ldmole.experiment.run_config import RunConfig
from ldmole.experiment.saved_config import adapter_run_config, load_run_config


@dataclasses.dataclass
class Target:
    """What PATH names: the adapter folder, the config to evaluate it under, and the metrics.json that
    scored this adapter (a run's final adapter/ only)."""

    adapter: Path
    config: RunConfig
    info: AdapterInfo
    run_metrics: Optional[RunMetrics]


def resolve_target(path: Path, data_dir: Optional[str], tokenizer: Optional[str]) -> Target:
    """The adapter and config of a run folder, an adapter folder, or an adapter folder inside a run
    (which keeps the run's data settings: protocol, selection carve, caps, batch size, precision).

    Raises:
        FileNotFoundError: PATH is neither (naming what was looked for).
    """
    if (path / "config.yaml").is_file() and (path / RUN_ADAPTER).is_dir():
        path = path / RUN_ADAPTER
    if not (path / INFO_NAME).is_file():
        raise FileNotFoundError(f"{path}: neither a run folder (config.yaml and adapter/) nor an adapter folder "
                                f"({INFO_NAME}); pass the output_dir of ldmole.cli.train or its adapter/")
    info, run_dir = AdapterInfo.read(path), path.parent
    if not (run_dir / "config.yaml").is_file():
        own = str(path) if info.tokenizer_in_folder else None  # the tokenizer saved with the adapter
        return Target(path, adapter_run_config(info, data_dir, tokenizer or own), info, None)
    metrics = run_dir / METRICS_NAME
    scored = path.name == RUN_ADAPTER and metrics.is_file()  # adapter_epochN/ is not what metrics.json scored
    return Target(path, load_run_config(run_dir, data_dir, tokenizer), info,
                  RunMetrics.read(metrics) if scored else None)


def _fits(spec: TaskSpec, info: AdapterInfo) -> bool:
    """Whether a task's base model is the adapter's: the same model kind and, with a label head, as many labels."""
    kind = spec.task_kind
    return kind.model_kind == info.model_kind and (not kind.label_head or spec.num_labels == info.num_labels)


def retarget(config: RunConfig, info: AdapterInfo, task: Optional[str]) -> RunConfig:
    """``config`` for ``task`` (default: the adapter's), checked against the adapter's head.

    Raises:
        ValueError: the task needs another head (naming --task and the tasks that fit).
    """
    if task is None or task == config.task:
        return config
    if not _fits(get_task(task), info):
        fitting = [name for name, spec in TASKS.items() if _fits(spec, info)]
        kind = next((kind for kind in TASK_KINDS if kind.model_kind == info.model_kind), None)
        what = f"a {kind.title} task" if kind is not None else "a task"
        if kind is not None and kind.label_head:
            what += f" with {info.num_labels} labels"
        raise ValueError(f"--task {task}: the adapter (trained on {info.task}) has a {info.model_kind} head; "
                         f"choose {what} ({', '.join(fitting) or 'none is registered'})")
    return dataclasses.replace(config, task=task)


def example_limit(requested: Optional[int], config: RunConfig, own_task: bool, split: str) -> Optional[int]:
    """How many examples to score: --max-examples (0 = all), else the run's cap on its own splits."""
    if requested is not None:
        return requested or None
    return config.data.eval_max_examples if own_task and split in PROTOCOL_SPLITS else None


def score(target: Target, config: RunConfig, split: str, limit: Optional[int], args: argparse.Namespace) -> dict:
    """Loads base + adapter, scores the split's first ``limit`` examples; the result dict (see docs/sharing.md)."""
    run = Run(config)
    examples = run.source_examples(split)[:limit]
    if not examples:
        raise ValueError(f"task {config.task!r} split {split!r} has no examples")
    loader = run.loader(examples, args.batch_size)
    device = torch.device(args.device)
    model = from_pretrained(target.adapter, base_model=args.base_model, tokenizer=config.backbone.tokenizer,
                            quantization=args.quantization).to(device)
    batch_size = loader.batch_size
    precision = args.mixed_precision or config.optim.mixed_precision or "no"  # a run's config.yaml records its own
    routing = RoutingStats()
    metrics = evaluate_routing(model, loader, run.task, examples, routing, autocast=autocast_for(precision, device),
                               progress=f"{config.task} {split}")
    return {"adapter": str(target.adapter), "base_model": args.base_model or target.info.base_model,
            "method": target.info.method, "trained_task": target.info.task, "task": config.task, "split": split,
            "protocol": config.data.protocol, "max_examples": limit, "batch_size": batch_size,
            "quantization": quantization_of(model),
            "mixed_precision": precision, **metrics, "routing": routing.summary()}


def reproduction_note(result: dict, run: Optional[RunMetrics], split: str) -> Optional[str]:
    """Whether the result reproduces metrics.json, when it scored the same examples (else None)."""
    if run is None or split != "evaluation" or result["task"] != run.task or \
            result["num_examples"] != run.num_eval_examples:
        return None
    same = result["accuracy"] == run.accuracy and \
        result["routing"].get("avg_active_experts") == run.routing.get("avg_active_experts")
    if same:
        return f"reproduces metrics.json (accuracy {run.accuracy:.4f} on the same {run.num_eval_examples} examples)"
    return (f"warning: metrics.json has accuracy {run.accuracy:.4f} and avg active experts "
            f"{run.routing.get('avg_active_experts')} on the same examples; this differs (another device, "
            "batch size, precision or base model than the run's?)")


def summary_lines(result: dict) -> list[str]:
    """The short printed summary: scores, answer counts, routing."""
    lines = [f"{result['method']} adapter ({result['trained_task']}) on {result['task']} {result['split']}: "
             f"accuracy {result['accuracy']:.4f} on {result['num_examples']} examples"]
    for key in ("mcc", "f1"):
        if key in result:
            lines.append(f"{key} {result[key]:.4f}")
    lines.append(f"predicted (class / option index: count) {result['prediction_counts']}; "
                 f"gold {result['label_counts']}")
    routing = result["routing"]
    if routing:
        line = (f"routing: {routing['avg_active_experts']:.3f} active experts per token over {routing['num_modules']} "
                f"modules, zero-activation rate {routing['zero_activation_rate']:.4f}")
        if "lambda" in routing:
            line += f", λ mean {routing['lambda']['mean']:.3f}"
        lines.append(line)
    else:
        lines.append("routing: none (plain LoRA)")
    return lines


def check_out(out: Optional[Path], force: bool) -> None:
    """Refuses an ``--out`` that exists (a run's metrics.json, an earlier result) unless ``--force``.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is off (naming the file and the flag).
    """
    if out is None:
        return
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a directory; pass a file name such as {out / 'eval.json'}")
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} already exists; pass --force to overwrite it, or another --out file")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of ldmole-eval."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (config.yaml, adapter/) or an adapter folder")
    parser.add_argument("--task", default=None, help="a registered task (default: the adapter's)")
    parser.add_argument("--split", default="evaluation",
                        help="evaluation (default), selection, or a source split name (validation, test, train)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="score the first N examples; 0 = all (default: the run's eval_max_examples on its own "
                             "task and split, else all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size (16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None, help="replaces the run's data_dir (null = the hub)")
    parser.add_argument("--tokenizer", default=None, help="replaces the run's tokenizer")
    parser.add_argument("--base-model", default=None, help="another location of the base model (hub id or directory)")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=None,
                        help="autocast (default: the run's mixed_precision for a run folder, else no)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="load the base in 4-bit (nf4, fp4) or 8-bit (int8) with bitsandbytes, or unquantised "
                             "(none) (default: as the adapter was trained; docs/quantization.md)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here (atomically)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Runs ldmole-eval; 2 with the reason on stderr when PATH, the task, the split or --out is refused."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_out(args.out, args.force)
        target = resolve_target(args.path, args.data_dir, args.tokenizer)
        config = retarget(target.config, target.info, args.task)
        limit = example_limit(args.max_examples, config, config.task == target.info.task, args.split)
        if limit is not None and limit < 0:
            raise ValueError(f"--max-examples {args.max_examples} must be 0 (all) or positive")
        result = score(target, config, args.split, limit, args)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    note = reproduction_note(result, target.run_metrics, args.split)
    if note:
        result["reproduces_metrics_json"] = not note.startswith("warning")
    for line in summary_lines(result) + ([note] if note else []):
        print(line)
    if args.out is not None:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
