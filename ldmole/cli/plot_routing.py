"""Routing figures of a finished run: reruns its adapter on evaluation examples and writes PNGs.

    ldmole-plot-routing runs/qwen3_1.7b/arc_c/ldmole/seed42 [--num-examples 64]
        [--out DIR] [--layer 12 --module q_proj --example 0] [--data-dir D --tokenizer T]

Reads RUN_DIR/config.yaml, adapter/ (and adapter_epoch1/ when present), loads the base model and
the run's evaluation split, runs the first N examples and writes to RUN_DIR/plots (or --out):

  active_experts_per_layer.png   mean active experts per layer, one line per module type, 25-75% bands
  lambda_per_layer.png           λ distribution per layer (Sparsegen with learned λ only)
  active_vs_token_frequency.png  active experts of rare vs frequent tokens (frequency in the training split)
  expert_share.png               expert share (layer × expert) after epoch 1, at the end, and the change
  zero_activation_rate.png       tokens with no active expert per layer (ReLU routing only)
  token_routing_L<l>_<module>_ex<i>.png   one example's tokens × experts in one layer and module

Relative paths in config.yaml (data_dir, tokenizer) are tried from the current directory, then
from the repository root; --data-dir / --tokenizer replace them. Plot functions:
ldmole/routing_plots.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

import numpy as np
import torch
import yaml

from ldmole import load_mole, routing_records
from ldmole.report import routing_plots as rp
from ldmole.experiment.data import (collate, encode_classification, encode_qa, get_chat_format, load_task,
                         pad_token_id_for)
from ldmole.experiment.evaluation import classification_metrics, option_scores, qa_metrics
from ldmole.experiment.models import language_model_parts, load_base_model, load_tokenizer, resolve_model_source
from ldmole.experiment.routing_stats import RoutingStats
from ldmole.experiment.run_config import compose_config


def load_run_config(run_dir: Path, data_dir: Optional[str], tokenizer: Optional[str]) -> dict:
    """The run's composed config (config.yaml re-validated), with the given path overrides.

    A relative data_dir / tokenizer that does not exist from the current directory but does from
    the repository root (where run.sh and ldmole-sweep run) is taken from there.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder written by ldmole-train")
    saved = yaml.safe_load(path.read_text()) or {}
    for key in ("data_dir", "tokenizer"):
        value = saved.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO_ROOT / value).exists():
            saved[key] = str(REPO_ROOT / value)
    if data_dir is not None:
        saved["data_dir"] = data_dir
    if tokenizer is not None:
        saved["tokenizer"] = tokenizer
    return compose_config(saved)


def encode(examples, kind: str, tokenizer, chat_format, max_length: int, truncate: bool) -> list[dict]:
    fn = encode_qa if kind == "qa" else encode_classification
    return [fn(example, tokenizer, chat_format, max_length, truncate=truncate) for example in examples]


def token_frequencies(features: list[dict], vocab_size: int) -> np.ndarray:
    """Occurrences of every token id in the encoded sequences (prompt and answer, as trained on)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for item in features:
        ids = np.asarray(item["input_ids"])
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return counts


@torch.no_grad()
def collect(model, features: list[dict], kind: str, pad_id: int, batch_size: int, device: torch.device):
    """Runs ``features`` through ``model``; returns (RoutingStats with tokens, predicted answers, gold answers)."""
    body, head = language_model_parts(model)
    routing = RoutingStats(keep_tokens=True)
    predictions, golds = [], []
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        routing.update(routing_records(model), batch["input_ids"], batch["attention_mask"])
        index = batch["last_prompt_index"] if kind == "qa" else batch["last_token_index"]
        logits = head(hidden[torch.arange(len(index)), index.to(device)]).float().cpu()
        if kind == "qa":
            pred = option_scores(logits, batch["option_token_ids"], batch["option_mask"]).argmax(-1)
            gold = batch["answer"]
        else:
            pred, gold = logits.argmax(-1), batch["label"]
        predictions.append(pred)
        golds.append(gold)
    return routing, torch.cat(predictions).numpy(), torch.cat(golds).numpy()


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
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_dir = args.run_dir
    try:
        config = load_run_config(run_dir, args.data_dir, args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config["mole"].get("router") == "lora":
        print("error: method lora has no router (one expert); there is no routing to plot", file=sys.stderr)
        return 2
    out = args.out or run_dir / "plots"
    name = f"{config['model']} · {config['task']} · {config['method']}"
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    # ---- data: the run's evaluation split, and the training split for token frequencies
    task_kwargs = dict(protocol=config["protocol"], selection_size=config.get("selection_size"),
                       seed=int(config["seed"]), skip_bad_rows=bool(config["skip_bad_rows"]))
    try:
        task = load_task(config["task_name"], config.get("data_dir"), **task_kwargs)
    except FileNotFoundError:  # no local training split (e.g. HellaSwag): count frequencies on the evaluated data
        task = load_task(config["task_name"], config.get("data_dir"), eval_only=True, **task_kwargs)
    kind = task.spec.kind
    tokenizer = load_tokenizer(str(config.get("tokenizer") or resolve_model_source(str(config["model_source"]))))
    chat_format = get_chat_format(config["chat_format"])
    max_length = int(config.get("max_length") or task.spec.max_length)
    features = encode(task.evaluation[: args.num_examples], kind, tokenizer, chat_format, max_length,
                      bool(config["truncate_long"]))
    if not 0 <= args.example < len(features):
        print(f"error: --example {args.example} is not among the {len(features)} examples run", file=sys.stderr)
        return 2
    if task.train:
        freq_source = f"training split ({min(len(task.train), args.freq_examples)} examples)"
        freq_features = encode(task.train[: args.freq_examples], kind, tokenizer, chat_format, max_length, True)
    else:
        freq_source, freq_features = f"evaluated examples ({len(features)}; no training split found)", features

    # ---- model: the base the run trained on (a random base is rebuilt from the run seed, as train() does)
    from accelerate.utils import set_seed

    set_seed(int(config["seed"]))
    model = load_base_model(config, "causal_lm" if kind == "qa" else "classification", tokenizer,
                            num_labels=task.spec.num_labels or 2)
    device = torch.device(args.device)
    adapters = [("final", run_dir / "adapter")]
    if (run_dir / "adapter_epoch1").is_dir():
        adapters.insert(0, ("after epoch 1", run_dir / "adapter_epoch1"))
    else:
        print("note: no adapter_epoch1/ in the run; expert_share.png shows the final adapter only", file=sys.stderr)
    collected, accuracy = {}, {}
    for label, adapter in adapters:
        load_mole(model, adapter)
        model.to(device).eval()
        collected[label], pred, gold = collect(model, features, kind, pad_token_id_for(tokenizer), args.batch_size,
                                               device)
        scores = qa_metrics(pred, gold) if kind == "qa" else classification_metrics(pred, gold, config["task"])
        accuracy[label] = scores["accuracy"]
        print(f"{label} ({adapter.name}/): accuracy {accuracy[label]:.3f} on {len(features)} examples; "
              f"predicted answers (class / option index: count) {scores['prediction_counts']}", file=sys.stderr)
    routing = collected["final"]
    # On the run's own evaluation examples the rerun must agree (bf16 noise may flip one prediction).
    if metrics.get("num_eval_examples") == len(features) and \
            abs(metrics["accuracy"] - accuracy["final"]) > 1.5 / len(features):
        print(f"warning: metrics.json has accuracy {metrics['accuracy']:.3f} on the same {len(features)} examples; "
              "the rerun differs, so its base model or data may not be the run's", file=sys.stderr)
    layer = args.layer if args.layer is not None else routing.layers[len(routing.layers) // 2]
    if (layer, args.module) not in routing.modules:
        print(f"error: no adapted module {args.module!r} in layer {layer}; layers "
              f"{routing.layers[0]}..{routing.layers[-1]}, modules {', '.join(routing.module_types)}", file=sys.stderr)
        return 2

    # ---- figures
    subtitle = f"{name} — {len(features)} {task.spec.eval_split} examples, {len(routing.token_ids)} tokens"
    max_experts = max(len(v) for v in routing.activation_counts.values())
    written = [rp.plot_active_experts_per_layer(rp.active_expert_bands(routing), out / "active_experts_per_layer.png",
                                                f"Active experts per layer: {subtitle}", max_experts)]
    lams = rp.lambda_by_layer(routing)
    if routing.router == "sparsegen" and lams:
        written.append(rp.plot_lambda_per_layer(lams, out / "lambda_per_layer.png", f"λ per layer: {subtitle}"))
    else:
        print(f"skip lambda_per_layer.png: router {routing.router!r} has no learned λ", file=sys.stderr)

    frequencies = token_frequencies(freq_features, max(len(tokenizer), int(routing.token_ids.max()) + 1))
    written.append(rp.plot_active_vs_token_frequency(
        frequencies[routing.token_ids], rp.mean_active_per_token(routing), out / "active_vs_token_frequency.png",
        f"Active experts vs token frequency: {subtitle}", frequency_source=freq_source))

    best = metrics.get("best_epoch")
    shares = {(f"final (best epoch {best})" if best and label == "final" else label):
              rp.expert_share_by_layer(collected_routing, args.share) for label, collected_routing in collected.items()}
    written.append(rp.plot_expert_share(shares, out / "expert_share.png",
                                        f"Expert share ({args.share}s) per layer: {name}", layers=routing.layers))

    if routing.router == "relu":
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
    lam = routing.lam(key) if routing.router == "sparsegen" else None
    written.append(rp.plot_token_routing(
        [rp.token_label(tokenizer.decode([int(t)])) for t in ids], routing.weights(key)[span][: len(ids)],
        out / f"token_routing_L{layer}_{args.module}_ex{args.example}.png",
        f"{name}: layer {layer} {args.module}, example {args.example} ({task.evaluation[args.example].uid}; {shown})",
        lam=None if lam is None else lam[span][: len(ids)]))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
