"""Routing figures (docs/method.md §5 analyses): plot functions on plain arrays, and what turns routing
records into those arrays.

Data path: :class:`ldmole.experiment.routing_stats.RoutingStats` with ``keep_tokens=True`` collects the
routing records of some forwards token by token (real tokens only); the ``*_by_layer`` / ``*_bands``
helpers reduce it to dicts of arrays; each
``plot_*`` function takes only such plain data and writes one PNG (matplotlib, Agg backend), so it
can be tested without a model. ``ldmole-plot-routing`` runs a saved adapter to get the records.

"Active" means a routing weight > 0: a token's active count in a module is the number of experts
that module's router gave a nonzero weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from ..experiment.routing_stats import RoutingStats  # noqa: E402

__all__ = [
    "active_expert_bands", "lambda_by_layer", "zero_activation_by_layer", "expert_share_by_layer",
    "mean_active_per_token", "frequency_buckets", "token_label", "routing_summary",
    "plot_active_experts_per_layer", "plot_lambda_per_layer", "plot_active_vs_token_frequency",
    "plot_expert_share", "plot_zero_activation_rate", "plot_token_routing",
]

PathLike = Union[str, Path]
DPI = 150


def active_expert_bands(routing: RoutingStats, low: float = 0.25,
                        high: float = 0.75) -> dict[str, dict[str, list[float]]]:
    """``{module_type: {"layer", "mean", "low", "high"}}``: mean and quantiles of the active count per layer."""
    bands: dict[str, dict[str, list[float]]] = {}
    for layer, module_type in routing.modules:
        active = routing.active((layer, module_type))
        band = bands.setdefault(module_type, {"layer": [], "mean": [], "low": [], "high": []})
        band["layer"].append(layer)
        band["mean"].append(float(active.mean()))
        band["low"].append(float(np.quantile(active, low)))
        band["high"].append(float(np.quantile(active, high)))
    return bands


def lambda_by_layer(routing: RoutingStats) -> dict[int, np.ndarray]:
    """``{layer: λ of every token and module of that layer}`` (empty for routers without λ)."""
    out: dict[int, list[np.ndarray]] = {}
    for key in routing.modules:
        lam = routing.lam(key)
        if lam is not None:
            out.setdefault(key[0], []).append(lam)
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def zero_activation_by_layer(routing: RoutingStats) -> dict[str, dict[str, list[float]]]:
    """``{module_type: {"layer", "rate"}}``: fraction of tokens with no active expert per layer."""
    out: dict[str, dict[str, list[float]]] = {}
    for layer, module_type in routing.modules:
        entry = out.setdefault(module_type, {"layer": [], "rate": []})
        entry["layer"].append(layer)
        entry["rate"].append(float((routing.active((layer, module_type)) == 0).mean()))
    return out


def expert_share_by_layer(routing: RoutingStats, kind: str = "activation") -> np.ndarray:
    """``[num_layers, max E]`` share of each expert per layer (rows sum to 1; NaN past a layer's E).

    ``kind="activation"``: share of the (token, expert) activations (as metrics.json's
    ``expert_share``); ``"weight"``: share of the routing weight mass. Each module's shares are
    computed first, then averaged over the module types of the layer.
    """
    if kind not in ("activation", "weight"):
        raise ValueError(f"kind={kind!r}; use 'activation' or 'weight'")
    totals = routing.activation_counts if kind == "activation" else routing.weight_sums
    layers = routing.layers
    width = max(len(v) for v in totals.values())
    share = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        per_module = [totals[key] / max(totals[key].sum(), 1e-12) for key in routing.modules if key[0] == layer]
        share[row, : len(per_module[0])] = np.mean(per_module, axis=0)
    return share


def mean_active_per_token(routing: RoutingStats) -> dict[str, np.ndarray]:
    """``{"all modules": [N], <module_type>: [N], ...}``: active count per token averaged over layers
    (and over module types for "all modules")."""
    by_type: dict[str, list[np.ndarray]] = {}
    for key in routing.modules:
        by_type.setdefault(key[1], []).append(routing.active(key).astype(np.float64))
    out = {"all modules": np.mean([a for parts in by_type.values() for a in parts], axis=0)}
    out.update({module_type: np.mean(parts, axis=0) for module_type, parts in by_type.items()})
    return out


def frequency_buckets(frequencies: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(bucket index per token, bucket labels): tokens grouped by decade of their frequency,
    ``0`` (unseen), ``1-9``, ``10-99``, ..."""
    frequencies = np.asarray(frequencies)
    top = int(frequencies.max()) if frequencies.size else 0
    edges = [0, 1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 10)
    labels = ["0"] + [_decade_label(lo, hi) for lo, hi in zip(edges[1:-1], edges[2:])]
    return np.searchsorted(edges, frequencies, side="right") - 1, labels


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    """``{"mean", "q05", "q25", "q50", "q75", "q95", "spread"}`` of ``values`` (spread = q95 - q05)."""
    qs = np.quantile(values, QUANTILES)
    out = {"mean": float(values.mean())}
    out.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)})
    out["spread"] = out["q95"] - out["q05"]
    return out


def routing_summary(routing: RoutingStats, frequencies: Optional[np.ndarray] = None) -> dict:
    """The numbers behind the figures, as plain JSON-able data.

    ``active_experts``: the active count over every (token, module) and per layer (averaged over the
    layer's module types, with its smallest value: Sparsegen never goes below 1);
    ``zero_activation_rate``: the fraction of (token, module) pairs with no active expert, overall and
    per layer; ``lambda``: λ quantiles over every (token, module) and per layer (None for routers
    without a learned λ); ``active_by_token_frequency`` (when ``frequencies [N]``, each evaluated
    token's count in the frequency source, is given): per frequency decade, the tokens in it and
    their mean active count (averaged over layers and module types) with its standard error.
    """
    active = {key: routing.active(key) for key in routing.modules}
    every = np.concatenate(list(active.values())).astype(np.float64)
    per_layer_active: dict[str, dict[str, float]] = {}
    per_layer_zero: dict[str, float] = {}
    for layer in routing.layers:
        values = np.concatenate([a for key, a in active.items() if key[0] == layer]).astype(np.float64)
        per_layer_active[str(layer)] = {"mean": float(values.mean()), "min": float(values.min())}
        per_layer_zero[str(layer)] = float((values == 0).mean())
    summary = {
        "router": routing.router,
        "num_tokens": int(len(routing.token_ids)),
        "num_examples": len(routing.example_lengths),
        "active_experts": {**_quantiles(every), "min": float(every.min()), "per_layer": per_layer_active},
        "zero_activation_rate": {"overall": float((every == 0).mean()), "per_layer": per_layer_zero},
        "lambda": None,
    }
    lams = lambda_by_layer(routing)
    if lams:
        summary["lambda"] = {**_quantiles(np.concatenate(list(lams.values())).astype(np.float64)),
                             "per_layer": {str(layer): _quantiles(values.astype(np.float64))
                                           for layer, values in sorted(lams.items())}}
    if frequencies is not None:
        per_token = mean_active_per_token(routing)["all modules"]
        bucket, labels = frequency_buckets(frequencies)
        rows = []
        for b, label in enumerate(labels):
            values = per_token[bucket == b]
            if values.size:
                rows.append({"occurrences": label, "tokens": int(values.size), "mean": float(values.mean()),
                             "se": float(values.std(ddof=0) / np.sqrt(values.size))})
        summary["active_by_token_frequency"] = rows
    return summary


def _decade_label(lo: int, hi: int) -> str:
    """``[lo, hi)`` as a label: "10–99", "100–999", "1k–<10k", ..."""
    if hi <= 1000:
        return f"{lo}–{hi - 1}"
    def short(n: int) -> str:
        return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)
    return f"{short(lo)}–<{short(hi)}"


def token_label(text: str) -> str:
    """A decoded token as a one-line label: newlines and tabs escaped, spaces shown as "·", "$"
    escaped (matplotlib would read "$...$" as math)."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·").replace("$", r"\$")


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_active_experts_per_layer(bands: Mapping[str, Mapping[str, Sequence[float]]], path: PathLike,
                                  title: str = "Active experts per layer", max_experts: Optional[int] = None) -> Path:
    """Mean active experts per token by layer, one line per module type, shaded between the ``low``
    and ``high`` quantiles (see :func:`active_expert_bands`). Attention and MLP module types get
    one panel each (fewer overlapping bands); a black line in both is the mean over all types."""
    attention = [n for n in bands if n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    groups = [("attention", attention), ("MLP and others", [n for n in bands if n not in attention])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups) + 1.5, 4.8), sharey=True, squeeze=False,
                             layout="constrained")
    colors = _colors(list(bands))
    layers_all = sorted({layer for band in bands.values() for layer in band["layer"]})
    overall = [np.mean([b["mean"][list(b["layer"]).index(layer)] for b in bands.values() if layer in b["layer"]])
               for layer in layers_all]
    for ax, (group, names) in zip(axes[0], groups):
        for name in names:
            band = bands[name]
            ax.plot(band["layer"], band["mean"], marker="o", ms=3, lw=1.6, color=colors[name], label=name)
            ax.fill_between(band["layer"], band["low"], band["high"], color=colors[name], alpha=0.15, lw=0)
        ax.plot(layers_all, overall, color="black", lw=2.2, ls="--", label="mean over all types")
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    axes[0][0].set_ylabel("active experts per token")
    if max_experts:
        axes[0][0].set_ylim(0, max_experts + 0.3)
    fig.suptitle(title + "\n(lines: mean over tokens; bands: 25–75% of tokens)", fontsize=11)
    return _save(fig, path)


def plot_lambda_per_layer(lams: Mapping[int, np.ndarray], path: PathLike, title: str = "λ per layer") -> Path:
    """Box per layer of the per-token λ (all module types of the layer pooled); whiskers 5–95%, ◆ = mean."""
    layers = sorted(lams)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 4.8))
    data = [np.asarray(lams[layer], dtype=float) for layer in layers]
    ax.boxplot(data, positions=layers, widths=0.6, whis=(5, 95), showfliers=False, patch_artist=True,
               boxprops=dict(facecolor="#9ecae1", edgecolor="#3182bd"), medianprops=dict(color="#08519c", lw=1.5))
    ax.scatter(layers, [d.mean() for d in data], marker="D", s=14, color="#d62728", zorder=3, label="mean")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("λ  (higher = sparser; λ→1: one expert)")
    ax.set_title(title + "\n(box: 25–75%, whiskers: 5–95% of tokens × modules)", fontsize=11)
    step = max(1, len(layers) // 16)
    ax.set_xticks(layers[::step], [str(layer) for layer in layers[::step]])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def plot_lambda_bands(bands: Mapping[str, Mapping[int, Mapping[str, float]]], path: PathLike,
                      title: str = "λ per layer") -> Path:
    """Median λ per layer (line) and its 5–95% range (band), one colour per label: runs side by side.

    ``bands``: ``{label: {layer: {"q05", "q50", "q95"}}}`` (routing_report.lambda_bands).
    """
    if not bands:
        raise ValueError("no run with a λ per layer to draw (only Sparsegen with a learned λ has one)")
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for label, color in _colors(list(bands)).items():
        layers = sorted(bands[label])
        q = {k: np.array([bands[label][layer][k] for layer in layers]) for k in ("q05", "q50", "q95")}
        ax.fill_between(layers, q["q05"], q["q95"], color=color, alpha=0.15, lw=0)
        ax.plot(layers, q["q50"], color=color, lw=1.6, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("λ  (higher = sparser; λ→1: one expert)")
    ax.set_title(title + "\n(line: median token, band: 5–95% of tokens × modules)", fontsize=11)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_active_vs_token_frequency(frequencies: np.ndarray, active: Mapping[str, np.ndarray], path: PathLike,
                                   title: str = "Active experts vs token frequency",
                                   frequency_source: str = "training split") -> Path:
    """Mean active experts per token (± standard error) by decade of the token's frequency.

    ``frequencies [N]``: how often each evaluated token occurs in ``frequency_source``;
    ``active``: ``{label: [N] active count per token}`` (the first label is drawn bold).
    """
    bucket, labels = frequency_buckets(frequencies)
    present = [b for b in range(len(labels)) if (bucket == b).any()]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = _colors(list(active))
    x = np.arange(len(present))
    for i, (name, values) in enumerate(active.items()):
        values = np.asarray(values, dtype=float)
        means = np.array([values[bucket == b].mean() for b in present])
        errors = np.array([values[bucket == b].std(ddof=0) / np.sqrt((bucket == b).sum()) for b in present])
        bold = i == 0
        ax.errorbar(x, means, yerr=errors, marker="o", ms=5 if bold else 3, lw=2.5 if bold else 1, capsize=3,
                    color="black" if bold else colors[name], alpha=1 if bold else 0.8, label=name,
                    zorder=3 if bold else 2)
    counts = [int((bucket == b).sum()) for b in present]
    ax.set_xticks(x, [f"{labels[b]}\n(n={c})" for b, c in zip(present, counts)])
    ax.set_xlabel(f"occurrences of the token in the {frequency_source}  (n = evaluated tokens in the bucket)")
    ax.set_ylabel("active experts per token (mean over layers)")
    ax.set_title(title + "\n(rare tokens left, frequent right; bars: ± standard error)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_expert_share(shares: Mapping[str, np.ndarray], path: PathLike, title: str = "Expert share per layer",
                      layers: Optional[Sequence[int]] = None) -> Path:
    """Heatmaps (layer × expert) of the expert share, side by side on one colour scale; with two
    panels a third shows their difference (second − first). NaN cells (no such expert) are grey."""
    names = list(shares)
    arrays = [np.asarray(shares[n], dtype=float) for n in names]
    panels = len(arrays) + (1 if len(arrays) == 2 else 0)
    num_layers, width = arrays[0].shape
    layers = list(layers) if layers is not None else list(range(num_layers))
    fig_height = max(3.5, 0.22 * num_layers + 1.8)
    fig, axes = plt.subplots(1, panels, figsize=(3.3 * panels + 1.5, fig_height), squeeze=False, sharey=True,
                             layout="constrained")
    axes = axes[0]
    vmax = float(np.nanmax([np.nanmax(a) for a in arrays]))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = None
    for ax, name, array in zip(axes, names, arrays):
        image = ax.imshow(np.ma.masked_invalid(array), aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=list(axes[: len(arrays)]), fraction=0.05, pad=0.02, label="share")
    if len(arrays) == 2:
        diff = arrays[1] - arrays[0]
        limit = max(float(np.nanmax(np.abs(diff))), 1e-3)  # a floor keeps identical panels readable
        dmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
        shown = axes[2].imshow(np.ma.masked_invalid(diff), aspect="auto", cmap=dmap,
                               norm=TwoSlopeNorm(0, -limit, limit), interpolation="nearest")
        unchanged = " (identical)" if not np.nanmax(np.abs(diff)) > 0 else ""
        short = [name.split(" (")[0] for name in names]
        axes[2].set_title(f"change: {short[1]} − {short[0]}{unchanged}", fontsize=10)
        fig.colorbar(shown, ax=axes[2], fraction=0.1, pad=0.02, label="share difference")
    step = max(1, num_layers // 16)
    for i, ax in enumerate(axes):
        ax.set_xticks(range(width), [str(e) for e in range(width)], fontsize=8)
        ax.set_xlabel("expert")
        if i == 0:
            ax.set_yticks(range(0, num_layers, step), [str(layers[r]) for r in range(0, num_layers, step)], fontsize=8)
            ax.set_ylabel("decoder layer")
        else:
            ax.tick_params(labelleft=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_zero_activation_rate(rates: Mapping[str, Mapping[str, Sequence[float]]], path: PathLike,
                              title: str = "Tokens with zero active experts") -> Path:
    """One line per module type: fraction of tokens whose router gave no expert a nonzero weight."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = _colors(list(rates))
    for name, entry in rates.items():
        ax.plot(entry["layer"], 100 * np.asarray(entry["rate"]), marker="o", ms=3, lw=1.5, color=colors[name],
                label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens with no active expert (%)")
    ax.set_title(title, fontsize=11)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_token_routing(tokens: Sequence[str], weights: np.ndarray, path: PathLike, title: str = "Token routing",
                       lam: Optional[np.ndarray] = None) -> Path:
    """Tokens (rows, in order) × experts (columns), colour = routing weight, blank = inactive (0);
    side panels: number of active experts per token, and λ when given."""
    weights = np.asarray(weights, dtype=float)
    num_tokens, num_experts = weights.shape
    if len(tokens) != num_tokens:
        raise ValueError(f"{len(tokens)} token labels for {num_tokens} rows of weights")
    ratios = [max(num_experts, 3), 2.2] + ([2.2] if lam is not None else [])
    height = max(4.0, 0.17 * num_tokens + 2.0)  # inches: one row per token plus title, colour bar, labels
    fig, axes = plt.subplots(1, len(ratios), figsize=(2.2 + 0.45 * num_experts + 2.4 * (len(ratios) - 1), height),
                             sharey=True, gridspec_kw={"width_ratios": ratios, "wspace": 0.08})
    fig.subplots_adjust(top=1 - 1.15 / height, bottom=0.55 / height)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = axes[0].imshow(np.ma.masked_equal(weights, 0.0), aspect="auto", cmap=cmap, vmin=0,
                           vmax=max(float(weights.max()), 1e-6), interpolation="nearest")
    axes[0].set_yticks(range(num_tokens), list(tokens), fontsize=7)
    axes[0].set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=8)
    axes[0].set_xlabel("expert")
    axes[0].set_ylabel("token (in order)")
    axes[0].set_xticks(np.arange(-0.5, num_experts), minor=True)
    axes[0].grid(which="minor", axis="x", color="#cccccc", lw=0.5)
    axes[0].tick_params(which="minor", length=0)
    rows = np.arange(num_tokens)
    axes[1].barh(rows, (weights > 0).sum(1), color="#6baed6", height=0.8)
    axes[1].set_xlim(0, num_experts + 0.5)
    axes[1].set_xlabel("active experts")
    axes[1].grid(axis="x", alpha=0.3)
    if lam is not None:
        axes[2].plot(np.asarray(lam, dtype=float), rows, color="#d62728", marker=".", ms=3, lw=1)
        axes[2].set_xlabel("λ")
        axes[2].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
        axes[2].grid(axis="x", alpha=0.3)
    left, right, top = axes[0].get_position().x0, axes[-1].get_position().x1, axes[0].get_position().y1
    bar = fig.add_axes([left, top + 0.25 / height, right - left, 0.12 / height])  # colour bar above the panels
    fig.colorbar(image, cax=bar, orientation="horizontal")
    bar.xaxis.set_ticks_position("top")
    bar.set_title("routing weight (blank = 0: expert inactive)", fontsize=9)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    return _save(fig, path)
