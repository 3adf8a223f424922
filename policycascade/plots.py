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
    """Accuracy (y) against mean MACs per sample (x, log scale); every policy in one picture.

    The legend sits outside the axes and every own point (one per alpha or setting) has
    its own legend entry instead of a text label beside it, so no marker is hidden: not
    the largest classifier's under the legend, not another's under a label.
    """
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
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
        marker = _OWN_MARKERS[i % len(_OWN_MARKERS)]
        for p in sorted(points, key=lambda p: p.macs):
            spread = f", mean ± std over {p.seeds} seeds" if p.seeds > 1 else ""
            ax.errorbar(
                [p.macs],
                [p.accuracy],
                xerr=[[min(p.macs_std, 0.9 * p.macs)], [p.macs_std]],
                yerr=[p.accuracy_std],
                fmt=marker,
                mfc="none",
                mew=1.8,
                ms=9,
                capsize=3,
                lw=1.2,
                label=f"{policy} {p.label}{spread}",
                zorder=5,
            )
    ax.set_xscale("log")
    ax.set_xlabel("mean MACs per sample (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("\n".join(textwrap.wrap(data.title, 80)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
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
    k = len(stage_names)
    if len(exit_counts) != k or len(matrix) != k or any(len(row) != k for row in matrix):
        raise ValueError(
            f"accuracy_by_exit_figure needs a {k} x {k} matrix and {k} exit counts for "
            f"{k} stage names, got {len(matrix)} rows and {len(exit_counts)} counts"
        )
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
