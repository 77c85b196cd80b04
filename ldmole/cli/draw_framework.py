"""Draw the LD-MoLE framework figure (imgs/framework.png) with matplotlib patches and arrows.

    ldmole-draw-framework [--out imgs/framework.png]

One adapted linear layer (docs/method.md §1-2): the frozen W0 x, plus E LoRA experts B_e A_e weighted by
p = Sparsegen(W_g x; λ), with a per-token λ from the shared λ-MLP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

REPO_ROOT = Path(__file__).resolve().parents[2]

FROZEN = ("#e8e8e8", "#7f7f7f")     # (fill, edge)
TRAINED = ("#dbe9f6", "#2b6cb0")
LAMBDA = ("#fde3cf", "#c05621")
ROUTE = ("#e3f1e0", "#2f855a")
INACTIVE = ("#f5f5f5", "#bbbbbb")
INK = "#222222"

# Example routing for the illustration: 8 experts, 3 active.
SCORES = [0.55, 0.15, 0.9, 0.3, 0.05, 0.7, 0.2, 0.35]
WEIGHTS = [0.2, 0.0, 0.55, 0.0, 0.0, 0.25, 0.0, 0.0]


def box(ax, x, y, w, h, text, colors, fontsize=11, dashed=False, weight="normal"):
    """A rounded box centred at (x, y) with centred text."""
    fill, edge = colors
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=fill, ec=edge, lw=1.6, ls="--" if dashed else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=INK, weight=weight)


def arrow(ax, start, end, text=None, color=INK, text_offset=(0, 0.18), rad=0.0, fontsize=10, ha="center"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.4, color=color,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha=ha, va="center", fontsize=fontsize, color=color)


def bars(ax, x, y, values, colors, width=1.3, height=0.75, label=None):
    """A small bar chart of ``values`` (E bars) in a frame centred at (x, y)."""
    fill, edge = colors
    ax.add_patch(Rectangle((x - width / 2, y - height / 2), width, height, fc="white", ec=edge, lw=1.2))
    step = width / len(values)
    top = max(values)
    for i, v in enumerate(values):
        if v > 0:
            ax.add_patch(Rectangle((x - width / 2 + i * step + step * 0.15, y - height / 2 + 0.05), step * 0.7,
                                   (height - 0.12) * v / top, fc=edge, ec="none"))
        else:
            ax.plot([x - width / 2 + i * step + step * 0.15, x - width / 2 + (i + 0.85) * step],
                    [y - height / 2 + 0.05] * 2, color="#999999", lw=1.5)
    if label:
        ax.text(x, y - height / 2 - 0.22, label, ha="center", va="top", fontsize=10, color=INK)


def draw_experts(ax, xin: float, ymid: float, yw0: float) -> tuple[float, float]:
    """The dropout, the E LoRA experts scaled by their weights pₑ and their sum into the frozen path.

    Returns the x of the ×pₑ column and the y of the lowest expert, where the routing weights arrive.
    """
    arrow(ax, (xin + 0.38, ymid), (2.55, ymid))
    box(ax, 3.2, ymid, 1.3, 0.55, "dropout", FROZEN, fontsize=10)
    ex, xmul, trunk, dy = 8.3, 9.65, 7.15, 0.47
    ys = [ymid + dy * (3.5 - e) for e in range(len(WEIGHTS))]
    ax.plot([3.85, trunk], [ymid, ymid], color=INK, lw=1.4)
    ax.plot([trunk, trunk], [ys[-1], ys[0]], color=INK, lw=1.4)
    xsum = 10.9
    for e, (y, p) in enumerate(zip(ys, WEIGHTS)):
        ink = INK if p > 0 else "#bbbbbb"
        arrow(ax, (trunk, y), (ex - 0.62, y), color=ink)
        box(ax, ex, y, 1.22, 0.36, f"B{_sub(e + 1)}A{_sub(e + 1)}", TRAINED if p > 0 else INACTIVE, fontsize=10,
            dashed=p == 0)
        ax.plot([ex + 0.62, xmul - 0.16], [y, y], color=ink, lw=1.2)
        ax.add_patch(Circle((xmul, y), 0.16, fc="white", ec=ink, lw=1.2))
        ax.text(xmul, y, "×", ha="center", va="center", fontsize=10, color=ink)
        ax.plot([xmul + 0.16, xsum - 0.27], [y, ymid], color=ink if p > 0 else "#dddddd", lw=1.0)
    ax.text(ex - 0.3, ys[0] + 0.33, "E LoRA experts (rank r)", ha="center", va="bottom", fontsize=10, color=TRAINED[1])
    ax.add_patch(FancyBboxPatch((xmul - 0.3, ys[-1] - 0.3), 0.6, ys[0] - ys[-1] + 0.6,
                                boxstyle="round,pad=0,rounding_size=0.15", fc="none", ec=ROUTE[1], lw=1.3, ls="--"))
    ax.text(xmul + 0.1, ys[0] + 0.33, "× pₑ", ha="center", va="bottom", fontsize=10, color=ROUTE[1])
    ax.add_patch(Circle((xsum, ymid), 0.27, fc="white", ec=INK, lw=1.6))
    ax.text(xsum, ymid, "Σ", ha="center", va="center", fontsize=14)
    arrow(ax, (xsum + 0.2, ymid + 0.2), (12.15, yw0 - 0.24), "× α/r", text_offset=(0.3, -0.1), ha="left")
    return xmul, ys[-1]


def draw(path: Path) -> Path:
    """Draws the framework figure to ``path`` (PNG, 150 dpi) and returns the path."""
    fig, ax = plt.subplots(figsize=(13.5, 8.1))
    ax.set_xlim(0, 14)
    ax.set_ylim(-0.95, 7.65)
    ax.set_aspect("equal")
    ax.axis("off")
    xin, ymid = 0.8, 4.3  # input node
    yw0, yrouter, ylam = 7.0, 1.35, -0.05  # rows: frozen path, router, λ

    # input and its four branches
    ax.add_patch(Circle((xin, ymid), 0.38, fc="white", ec=INK, lw=1.6))
    ax.text(xin, ymid, "x", ha="center", va="center", fontsize=16, style="italic")
    ax.text(xin - 0.45, ymid - 0.05, "token\ninput", ha="right", va="center", fontsize=9, color="#555555")
    ax.plot([xin, xin], [ymid + 0.38, yw0], color=INK, lw=1.4)
    ax.plot([xin, xin], [ymid - 0.38, ylam], color=INK, lw=1.4)

    # frozen path
    arrow(ax, (xin, yw0), (5.4, yw0))
    box(ax, 6.5, yw0, 2.2, 0.7, "W₀  (frozen)", FROZEN, fontsize=12)
    ax.add_patch(Circle((12.35, yw0), 0.3, fc="white", ec=INK, lw=1.6))
    ax.text(12.35, yw0, "+", ha="center", va="center", fontsize=18)
    arrow(ax, (7.6, yw0), (12.05, yw0), "W₀x", text_offset=(0, 0.2))
    arrow(ax, (12.65, yw0), (13.45, yw0))
    ax.text(13.55, yw0, "h", ha="left", va="center", fontsize=16, style="italic")

    # experts: E LoRA pairs on dropout(x), each scaled by its weight p_e, then summed
    xmul, y_last = draw_experts(ax, xin, ymid, yw0)

    # router and Sparsegen
    arrow(ax, (xin, yrouter), (1.65, yrouter))
    box(ax, 2.35, yrouter, 1.4, 0.7, "router $W_g$", TRAINED, fontsize=11)
    arrow(ax, (3.05, yrouter), (3.4, yrouter))
    bars(ax, 4.05, yrouter, SCORES, ROUTE)
    ax.text(4.05, yrouter + 0.5, "scores u = $W_g$x", ha="center", va="bottom", fontsize=10)
    arrow(ax, (4.7, yrouter), (5.15, yrouter))
    box(ax, 6.45, yrouter, 2.6, 0.9, "Sparsegen(u; λ)\n= sparsemax(u / (1 − λ))", ROUTE, fontsize=10)
    arrow(ax, (7.75, yrouter), (8.05, yrouter))
    bars(ax, 8.7, yrouter, WEIGHTS, ROUTE)
    ax.text(8.7, yrouter - 0.5, "weights p: sparse,\nΣ p = 1, ≥ 1 expert active", ha="center", va="top",
            fontsize=9.5)
    ax.plot([9.35, xmul, xmul], [yrouter, yrouter, yrouter + 0.25], color=ROUTE[1], lw=1.4)
    arrow(ax, (xmul, yrouter + 0.25), (xmul, y_last - 0.3), color=ROUTE[1])

    # λ-MLP, shared by every layer (one per input width)
    arrow(ax, (xin, ylam), (1.4, ylam))
    box(ax, 2.75, ylam, 2.7, 0.62, "λ-MLP (shared across layers)\nLinear → ReLU → Linear", LAMBDA, fontsize=9.5)
    arrow(ax, (4.1, ylam), (4.6, ylam))
    box(ax, 6.45, ylam, 3.7, 0.62, "λ = logsigmoid(MLP(x)) + 1 − ε", LAMBDA, fontsize=10.5)
    arrow(ax, (6.45, ylam + 0.31), (6.45, yrouter - 0.45), "λ < 1, per token", color=LAMBDA[1],
          text_offset=(-0.12, 0.0), ha="right", fontsize=9)

    # legend
    handles = [Rectangle((0, 0), 1, 1, fc=c[0], ec=c[1]) for c in (FROZEN, TRAINED, ROUTE, LAMBDA, INACTIVE)]
    ax.legend(handles, ["frozen", "trained", "routing", "λ prediction", "inactive expert (pₑ = 0)"],
              loc="lower center", bbox_to_anchor=(0.5, 0.0), fontsize=9.5, frameon=False, ncol=5)
    ax.set_title("LD-MoLE layer:   h = W₀x + (α/r) Σₑ pₑ Bₑ Aₑ dropout(x),    p = Sparsegen($W_g$x; λ(x))",
                 fontsize=13, pad=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _sub(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "imgs" / "framework.png")
    args = parser.parse_args(argv)
    print(draw(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
