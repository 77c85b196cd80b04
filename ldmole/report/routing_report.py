"""Markdown tables that compare the routing of runs, from the ``routing_summary.json`` files that
``ldmole-plot-routing`` writes (``RUN_DIR/plots/`` for the trained adapter, ``RUN_DIR/plots_init/``
with ``--at-init`` for the adapter before training). A run folder without a trained summary falls
back to the routing statistics its ``metrics.json`` holds (the same evaluation, measured during
training's final scoring): all but the fewest-active count and the token-frequency rows.

Three tables: an overview (accuracy, active experts with their smallest value, zero-activation rate,
λ quantiles), per layer (λ q05–q95 and mean active experts of every summary, side by side), and
active experts by token frequency. Each number is read from a summary; nothing is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..experiment.metrics import METRICS_NAME

__all__ = ["Summary", "find_summaries", "lambda_bands", "overview_markdown", "per_layer_markdown",
           "summary_from_metrics", "token_frequency_markdown"]

SUMMARY_NAME = "routing_summary.json"
FOLDERS = (("plots_init", "before training"), ("plots", "trained"))
MISSING = "—"


@dataclass
class Summary:
    """One routing_summary.json with the label its tables show."""

    label: str
    data: dict

    @property
    def accuracy(self) -> Optional[float]:
        """Accuracy (%) of the adapter the summary describes."""
        values = list((self.data.get("accuracy") or {}).values())
        return 100 * values[-1] if values else None


def _run_label(run_dir: Path) -> str:
    """``<method> seed<seed>`` (and ``sparsity_coef=<c>`` from a study folder name) of a sweep run folder."""
    parts = run_dir.resolve().parts
    label = f"{parts[-2]} {parts[-1]}" if len(parts) >= 2 else run_dir.name
    coef = next((p for p in parts if p.startswith("sparsity_coef_")), None)
    return label + (f" (sparsity_coef={coef.split('_', 2)[2]})" if coef else "")


def _lambda_quantiles(quantiles: dict, mean: Optional[float]) -> dict:
    """A routing_summary.json λ entry (q05…q95, spread, mean) from a metrics.json quantile dict."""
    return {"mean": mean, **quantiles, "spread": quantiles["q95"] - quantiles["q05"]}


def summary_from_metrics(metrics: dict) -> Optional[dict]:
    """The routing_summary.json fields that a run's metrics.json holds, or None when it has no
    routing statistics (plain LoRA). Its λ quantiles come from a histogram of 0.01-wide bins on
    [-10, 1): a λ below -10 reads -9.995."""
    routing = metrics.get("routing")
    if not routing:
        return None
    per_layer = routing.get("per_layer", {})
    summary = {
        "num_examples": metrics.get("num_eval_examples"),
        "accuracy": {"final": metrics["accuracy"]},
        "active_experts": {"mean": routing["avg_active_experts"],
                           "per_layer": {k: {"mean": v["avg_active_experts"]} for k, v in per_layer.items()}},
        "zero_activation_rate": {"overall": routing["zero_activation_rate"],
                                 "per_layer": {k: v["zero_activation_rate"] for k, v in per_layer.items()}},
        "lambda": None,
    }
    lam = routing.get("lambda")
    if lam and lam.get("quantiles"):
        layer_means = lam.get("per_layer_mean", {})
        summary["lambda"] = {**_lambda_quantiles(lam["quantiles"], lam.get("mean")),
                             "per_layer": {k: _lambda_quantiles(q, layer_means.get(k))
                                           for k, q in lam.get("per_layer_quantiles", {}).items()}}
    return summary


def find_summaries(paths: Sequence[Union[str, Path]]) -> list[Summary]:
    """The summaries of ``paths``: a run folder gives its plots_init/ (before training) and plots/
    (trained) summaries, whichever exist, and without plots/ the routing of its metrics.json; a
    routing_summary.json or a folder holding one is taken as is.

    Raises:
        FileNotFoundError: a path holds no summary (the message says how to make one).
    """
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(Summary(path.parent.name, json.loads(path.read_text())))
            continue
        if (path / SUMMARY_NAME).is_file():
            found.append(Summary(path.name, json.loads((path / SUMMARY_NAME).read_text())))
            continue
        here = [(folder, when) for folder, when in FOLDERS if (path / folder / SUMMARY_NAME).is_file()]
        from_metrics = None
        if all(folder != "plots" for folder, _ in here) and (path / METRICS_NAME).is_file():
            from_metrics = summary_from_metrics(json.loads((path / METRICS_NAME).read_text()))
        if not here and from_metrics is None:
            raise FileNotFoundError(
                f"{path}: no {SUMMARY_NAME} in it, nor in its plots/ or plots_init/, and no routing in a "
                f"{METRICS_NAME}; run `ldmole-plot-routing {path}` (and with --at-init for the adapter before "
                f"training)")
        for folder, when in here:
            found.append(Summary(f"{_run_label(path)}, {when}",
                                 json.loads((path / folder / SUMMARY_NAME).read_text())))
        if from_metrics is not None:
            found.append(Summary(f"{_run_label(path)}, trained", from_metrics))
    return found


def _num(value: Optional[float], digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def overview_markdown(summaries: Sequence[Summary]) -> str:
    """One row per summary: examples, accuracy, active experts (mean, smallest), zero-activation rate, λ quantiles."""
    lines = ["| routing | examples | accuracy % | active experts (mean) | fewest active | tokens with none active "
             "| λ q05 / q50 / q95 | λ spread q95−q05 |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        active, lam, examples = s.data["active_experts"], s.data.get("lambda"), s.data.get("num_examples")
        lam_text = MISSING if lam is None else f"{lam['q05']:.2f} / {lam['q50']:.2f} / {lam['q95']:.2f}"
        zero = 100 * s.data["zero_activation_rate"]["overall"]
        lines.append(f"| {s.label} | {MISSING if examples is None else examples} | {_num(s.accuracy, 1)} | "
                     f"{active['mean']:.2f} | {_num(active.get('min'), 0)} | {zero:.2f}% | {lam_text} | "
                     f"{MISSING if lam is None else format(lam['spread'], '.2f')} |")
    return "\n".join(lines) + "\n"


def per_layer_markdown(summaries: Sequence[Summary], layers: Optional[Sequence[int]] = None) -> str:
    """Per layer: each summary's λ q05–q95 (when it has λ) and mean active experts."""
    all_layers = sorted({int(layer) for s in summaries for layer in s.data["active_experts"]["per_layer"]})
    shown = [layer for layer in all_layers if layers is None or layer in set(layers)]
    headers = ["layer"]
    for s in summaries:
        if s.data.get("lambda") is not None:
            headers.append(f"λ q05–q95: {s.label}")
    headers += [f"active: {s.label}" for s in summaries]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---|" * (len(headers) - 1)]
    for layer in shown:
        key, cells = str(layer), [str(layer)]
        for s in summaries:
            lam = s.data.get("lambda")
            if lam is not None:
                q = lam["per_layer"].get(key)
                cells.append(MISSING if q is None else f"{q['q05']:.2f} … {q['q95']:.2f}")
        for s in summaries:
            entry = s.data["active_experts"]["per_layer"].get(key)
            cells.append(MISSING if entry is None else f"{entry['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def token_frequency_markdown(summaries: Sequence[Summary]) -> str:
    """Mean active experts (± SE) by how often the token occurs in the training split, one column per summary."""
    with_rows = [s for s in summaries if s.data.get("active_by_token_frequency")]
    buckets: list[str] = []
    for s in with_rows:
        for row in s.data["active_by_token_frequency"]:
            if row["occurrences"] not in buckets:
                buckets.append(row["occurrences"])
    lines = ["| occurrences in training | " + " | ".join(s.label for s in with_rows) + " |",
             "|---|" + "---|" * len(with_rows)]
    for bucket in buckets:
        cells = [bucket]
        for s in with_rows:
            row = next((r for r in s.data["active_by_token_frequency"] if r["occurrences"] == bucket), None)
            cells.append(MISSING if row is None else f"{row['mean']:.2f} ± {row['se']:.3f} (n={row['tokens']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lambda_bands(summaries: Sequence[Summary]) -> dict[str, dict[int, dict[str, float]]]:
    """``{label: {layer: {q05, q50, q95}}}`` of every summary with λ per layer (for plot_lambda_bands)."""
    return {s.label: {int(layer): {q: entry[q] for q in ("q05", "q50", "q95")}
                      for layer, entry in s.data["lambda"]["per_layer"].items()}
            for s in summaries if (s.data.get("lambda") or {}).get("per_layer")}
