"""Routing figures of a finished run: reruns its adapter on evaluation examples and writes PNGs.

    python -m ldmole.cli.plot_routing runs/qwen3_1.7b/arc_c/ldmole/seed42 [--num-examples 64]
        [--out DIR] [--layer 12 --module q_proj --example 0] [--data-dir D --tokenizer T] [--at-init]

Reads RUN_DIR/config.yaml, adapter/ (and adapter_epoch1/ when present), loads the base model and
the run's evaluation split, runs the first N examples and writes to RUN_DIR/plots (or --out):

  active_experts_per_layer.png   mean active experts per layer, one line per module type, 25-75% bands
  lambda_per_layer.png           λ distribution per layer (Sparsegen with learned λ only)
  active_vs_token_frequency.png  active experts of rare vs frequent tokens (frequency in the training split)
  expert_share.png               expert share (layer × expert) after epoch 1, at the end, and the change
  zero_activation_rate.png       tokens with no active expert per layer (ReLU routing only)
  token_routing_L<l>_<module>_ex<i>.png   one example's tokens × experts in one layer and module
  routing_summary.json           the numbers behind them: active experts (overall, per layer, by token
                                 frequency), zero-activation rate, λ quantiles overall and per layer

--at-init draws the same figures for the adapter as the run's seed initialised it, before any step
(the run's adapter files are not read; the default folder is RUN_DIR/plots_init), so that a run's
routing can be compared before and after training.

Relative paths in config.yaml (data_dir, tokenizer) are tried from the current directory, then
from the repository root; --data-dir / --tokenizer replace them. Plot functions:
ldmole/report/routing_plots.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ldmole import get_router
from ldmole.core.routers import LORA
from ldmole.experiment.data import Example, TaskData, TaskSpec
from ldmole.experiment.evaluation import evaluate_routing
from ldmole.experiment.metrics import RunMetrics
from ldmole.experiment.routing_stats import RoutingStats
from ldmole.experiment.run import Run
from ldmole.report import routing_plots as rp


def token_frequencies(features: list[dict], vocab_size: int) -> np.ndarray:
    """Occurrences of every token id in the encoded sequences (prompt and answer, as trained on)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for item in features:
        ids = np.asarray(item["input_ids"])
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return counts


def collect(model, loader, task: TaskSpec, examples: list[Example]) -> tuple[RoutingStats, dict]:
    """Runs ``loader`` through ``model``; returns its routing (with per-token arrays) and its scores
    (accuracy, answer counts)."""
    routing = RoutingStats(keep_tokens=True)
    return routing, evaluate_routing(model, loader, task, examples, routing)


def load_inputs(run: Run, num_examples: int, freq_examples: int) -> tuple[TaskData, list[Example], list, list, str]:
    """(task data, the first evaluation examples, their features, features to count token frequencies
    on, where those come from): the training split, or the evaluated examples when it is absent."""
    try:
        data = run.task_data()
    except FileNotFoundError:  # no local training split (e.g. HellaSwag): count frequencies on the evaluated data
        data = run.task_data(eval_only=True)
    examples = data.evaluation[:num_examples]
    features = run.features(examples)
    if data.train:
        freq_source = f"training split ({min(len(data.train), freq_examples)} examples)"
        return data, examples, features, run.features(data.train[:freq_examples], truncate=True), freq_source
    return data, examples, features, features, f"evaluated examples ({len(features)}; no training split found)"


INIT_LABEL = "at initialisation"


def rerun_adapters(run: Run, examples: list[Example], run_dir: Path,
                   args: argparse.Namespace) -> tuple[dict[str, RoutingStats], dict[str, float]]:
    """Routing and accuracy of the run's adapters (after epoch 1 when saved, and the final one) on ``examples``,
    each on the base the run trained on (a random base is rebuilt from the run seed, as train() does).
    With ``args.at_init``: of the adapter as train() initialises it (the same seed, then the same injection)."""
    device = torch.device(args.device)
    loader = run.loader(examples, args.batch_size)
    adapters: list[tuple[str, Optional[Path]]] = [("final", run_dir / "adapter")]
    if args.at_init:
        adapters = [(INIT_LABEL, None)]
    elif (run_dir / "adapter_epoch1").is_dir():
        adapters.insert(0, ("after epoch 1", run_dir / "adapter_epoch1"))
    else:
        print("note: no adapter_epoch1/ in the run; expert_share.png shows the final adapter only", file=sys.stderr)
    collected, accuracy = {}, {}
    for label, adapter in adapters:
        model = run.mole_model(adapter).to(device).eval()  # None: injected as train() does, no adapter files read
        collected[label], scores = collect(model, loader, run.task, examples)
        del model
        accuracy[label] = scores["accuracy"]
        source = "" if adapter is None else f" ({adapter.name}/)"
        print(f"{label}{source}: accuracy {accuracy[label]:.3f} on {len(examples)} examples; "
              f"predicted answers (class / option index: count) {scores['prediction_counts']}", file=sys.stderr)
    return collected, accuracy


def write_figures(run: Run, args: argparse.Namespace, out: Path, examples: list[Example],
                  collected: dict[str, RoutingStats], accuracy: dict[str, float], freq_features: list[dict],
                  freq_source: str, best: Optional[int], layer: int) -> list[Path]:
    """Every figure of the module docstring and routing_summary.json; returns the paths written."""
    config, tokenizer = run.config, run.tokenizer
    name = f"{config.model} · {config.task} · {config.method}" + (f" · {INIT_LABEL}" if args.at_init else "")
    routing = list(collected.values())[-1]  # the final adapter (or the initial one)
    subtitle = f"{name} — {len(examples)} {run.task.eval_split} examples, {len(routing.token_ids)} tokens"
    max_experts = max(len(v) for v in routing.activation_counts.values())
    written = [rp.plot_active_experts_per_layer(rp.active_expert_bands(routing), out / "active_experts_per_layer.png",
                                                f"Active experts per layer: {subtitle}", max_experts)]
    lams = rp.lambda_by_layer(routing)
    if get_router(routing.router).learned_lambda and lams:
        written.append(rp.plot_lambda_per_layer(lams, out / "lambda_per_layer.png", f"λ per layer: {subtitle}"))
    else:
        print(f"skip lambda_per_layer.png: router {routing.router!r} has no learned λ", file=sys.stderr)

    frequencies = token_frequencies(freq_features, max(len(tokenizer), int(routing.token_ids.max()) + 1))
    summary = {"run_dir": str(args.run_dir), "adapter": INIT_LABEL if args.at_init else "final",
               "accuracy": accuracy, "frequency_source": freq_source,
               **rp.routing_summary(routing, frequencies[routing.token_ids])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    written.append(out / "routing_summary.json")
    written.append(rp.plot_active_vs_token_frequency(
        frequencies[routing.token_ids], rp.mean_active_per_token(routing), out / "active_vs_token_frequency.png",
        f"Active experts vs token frequency: {subtitle}", frequency_source=freq_source))

    shares = {(f"final (best epoch {best})" if best and label == "final" else label):
              rp.expert_share_by_layer(collected_routing, args.share) for label, collected_routing in collected.items()}
    written.append(rp.plot_expert_share(shares, out / "expert_share.png",
                                        f"Expert share ({args.share}s) per layer: {name}", layers=routing.layers))

    if not get_router(routing.router).routes_every_token:
        written.append(rp.plot_zero_activation_rate(rp.zero_activation_by_layer(routing),
                                                    out / "zero_activation_rate.png",
                                                    f"Tokens with zero active experts: {subtitle}"))
    else:
        print(f"skip zero_activation_rate.png: router {routing.router!r} always activates at least one expert",
              file=sys.stderr)

    key, span = (layer, args.module), routing.example_slice(args.example)
    ids = routing.token_ids[span][: args.max_tokens]
    total = span.stop - span.start
    shown = f"first {len(ids)} of {total} tokens" if len(ids) < total else f"{total} tokens"
    lam = routing.lam(key) if get_router(routing.router).learned_lambda else None
    written.append(rp.plot_token_routing(
        [rp.token_label(tokenizer.decode([int(t)])) for t in ids], routing.weights(key)[span][: len(ids)],
        out / f"token_routing_L{layer}_{args.module}_ex{args.example}.png",
        f"{name}: layer {layer} {args.module}, example {args.example} ({examples[args.example].uid}; {shown})",
        lam=None if lam is None else lam[span][: len(ids)]))
    return written


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (config.yaml, adapter/, adapter_epoch1/)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default RUN_DIR/plots)")
    parser.add_argument("--num-examples", type=int, default=64, help="evaluation examples to run (the first N)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=None, help="token view: decoder layer (default: the middle one)")
    parser.add_argument("--module", default="q_proj", help="token view: module type (q_proj ... down_proj)")
    parser.add_argument("--example", type=int, default=0, help="token view: index among the N examples")
    parser.add_argument("--max-tokens", type=int, default=160, help="token view: show at most the first M tokens")
    parser.add_argument("--freq-examples", type=int, default=10000,
                        help="token frequencies are counted in the first K training examples")
    parser.add_argument("--share", choices=("activation", "weight"), default="activation",
                        help="expert share of the activations (as metrics.json) or of the routing weight mass")
    parser.add_argument("--data-dir", default=None, help="replaces config.yaml's data_dir")
    parser.add_argument("--tokenizer", default=None, help="replaces config.yaml's tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--at-init", action="store_true",
                        help="the adapter as the run's seed initialised it, before training "
                             "(default out: RUN_DIR/plots_init)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_dir = args.run_dir
    try:
        run = Run.from_folder(run_dir, args.data_dir, args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = run.config
    if config.mole.router == LORA:
        print("error: method lora has no router (one expert); there is no routing to plot", file=sys.stderr)
        return 2
    metrics_path = run_dir / "metrics.json"
    metrics = RunMetrics.read(metrics_path) if metrics_path.is_file() else None
    _, examples, features, freq_features, freq_source = load_inputs(run, args.num_examples, args.freq_examples)
    if not 0 <= args.example < len(features):
        print(f"error: --example {args.example} is not among the {len(features)} examples run", file=sys.stderr)
        return 2
    collected, accuracy = rerun_adapters(run, examples, run_dir, args)
    routing = list(collected.values())[-1]
    # On the run's own evaluation examples the rerun must agree (bf16 noise may flip one prediction).
    if metrics is not None and not args.at_init and metrics.num_eval_examples == len(features) and \
            abs(metrics.accuracy - accuracy["final"]) > 1.5 / len(features):
        print(f"warning: metrics.json has accuracy {metrics.accuracy:.3f} on the same {len(features)} examples; "
              "the rerun differs, so its base model or data may not be the run's", file=sys.stderr)
    layer = args.layer if args.layer is not None else routing.layers[len(routing.layers) // 2]
    if (layer, args.module) not in routing.modules:
        print(f"error: no adapted module {args.module!r} in layer {layer}; layers "
              f"{routing.layers[0]}..{routing.layers[-1]}, modules {', '.join(routing.module_types)}", file=sys.stderr)
        return 2
    out = args.out or run_dir / ("plots_init" if args.at_init else "plots")
    written = write_figures(run, args, out, examples, collected, accuracy, freq_features, freq_source,
                            metrics.best_epoch if metrics else None, layer)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
