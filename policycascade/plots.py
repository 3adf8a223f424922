"""Figures for comparisons: the accuracy-vs-MACs trade-off and the per-exit accuracy matrix."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass
class OwnPoint:
    """A run's own policy at one setting: mean (and std over seeds) of MACs and accuracy."""

    label: str
    macs: float
    accuracy: float
    macs_std: float = 0.0
    accuracy_std: float = 0.0
    seeds: int = 1


@dataclass
class TradeoffData:
    """What the trade-off figure draws."""

    title: str
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (macs, acc)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)  # singles, oracle
    random: list[tuple[float, float]] = field(default_factory=list)
    own: dict[str, list[OwnPoint]] = field(default_factory=dict)  # per policy


_OWN_MARKERS = ("o", "D", "^", "v", "P", "X")


def tradeoff_figure(data: TradeoffData):
    """Accuracy (y) against mean MACs per sample (x, log scale); every policy in one picture."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, values in data.curves.items():
        values = sorted(values)
        ax.plot([m for m, _ in values], [a for _, a in values], lw=1.2, alpha=0.8, label=name)
    for name, (macs, acc) in data.points.items():
        marker = "*" if name == "oracle" else "s"
        ax.scatter([macs], [acc], marker=marker, s=80, zorder=3, label=name, edgecolors="black")
    if data.random:
        ax.scatter(
            [m for m, _ in data.random],
            [a for _, a in data.random],
            marker="x",
            color="grey",
            zorder=3,
            label="random stopping at matched cost",
        )
    for i, (policy, points) in enumerate(sorted(data.own.items())):
        points = sorted(points, key=lambda p: p.macs)
        seeds = max(p.seeds for p in points)
        label = policy + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else "")
        ax.errorbar(
            [p.macs for p in points],
            [p.accuracy for p in points],
            xerr=[[min(p.macs_std, 0.9 * p.macs) for p in points], [p.macs_std for p in points]],
            yerr=[p.accuracy_std for p in points],
            fmt=_OWN_MARKERS[i % len(_OWN_MARKERS)],
            mfc="none",
            mew=1.8,
            ms=9,
            capsize=3,
            lw=1.2,
            label=label,
            zorder=5,
        )
        for j, p in enumerate(points):  # alternate above/below so labels do not overlap
            ax.annotate(
                p.label,
                (p.macs, p.accuracy),
                textcoords="offset points",
                xytext=(6, 8 if j % 2 == 0 else -14),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xlabel("mean MACs per sample (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("\n".join(textwrap.wrap(data.title, 80)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    return fig


def accuracy_by_exit_figure(
    matrix: list[list[float | None]],
    stage_names: list[str],
    exit_counts: list[int],
    title: str,
):
    """Guan et al. Figure 4: each classifier's accuracy on the samples exiting at each stage.

    Rows are exit stages (with their sample counts), columns classifiers; rows with
    no samples are marked as such.
    """
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    image = ax.imshow(np.nan_to_num(data, nan=0.0), vmin=0, vmax=1, cmap="viridis")
    image.set_alpha(np.where(np.isfinite(data), 1.0, 0.0))
    ax.set_xticks(range(len(stage_names)), stage_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(
        range(len(stage_names)),
        [f"exit {n}\n(n={c})" for n, c in zip(stage_names, exit_counts, strict=True)],
        fontsize=8,
    )
    for i in range(data.shape[0]):
        if exit_counts[i] == 0:
            ax.text(
                data.shape[1] / 2 - 0.5,
                i,
                "no samples exit here",
                ha="center",
                va="center",
                fontsize=8,
                color="grey",
            )
            continue
        for j in range(data.shape[1]):
            ax.text(
                j,
                i,
                f"{data[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if data[i, j] < 0.6 else "black",
            )
    ax.set_xlabel("classifier")
    ax.set_ylabel("samples that exit at")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label("accuracy on those samples")
    fig.tight_layout()
    return fig
