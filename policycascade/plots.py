"""Figures for comparisons: the accuracy-vs-MACs trade-off and the per-exit accuracy matrix."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def tradeoff_figure(
    curves: dict[str, list[tuple[float, float]]],
    points: dict[str, tuple[float, float]],
    learned: list[tuple[float, float, float, float, str]],
    best: tuple[float, float] | None,
    title: str,
):
    """Accuracy (y) against mean MACs per sample (x).

    ``curves``: one line per rule (sorted by MACs); ``points``: single classifiers and
    the oracle; ``learned``: REINFORCE points (macs, acc, macs_std, acc_std, label)
    with error bars over seeds; ``best`` is ringed.
    """
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, values in curves.items():
        values = sorted(values)
        ax.plot([m for m, _ in values], [a for _, a in values], marker=".", lw=1.2, label=name)
    for name, (macs, acc) in points.items():
        marker = "*" if name == "oracle" else "s"
        ax.scatter([macs], [acc], marker=marker, s=70, zorder=3, label=name)
    if learned:
        ax.errorbar(
            [p[0] for p in learned],
            [p[1] for p in learned],
            xerr=[[min(p[2], 0.9 * p[0]) for p in learned], [p[2] for p in learned]],
            yerr=[p[3] for p in learned],
            fmt="o-",
            color="black",
            capsize=3,
            lw=1.5,
            label="REINFORCE (mean ± std over seeds)",
            zorder=4,
        )
        for macs, acc, _, _, label in learned:
            ax.annotate(label, (macs, acc), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if best is not None:
        ax.scatter(
            [best[0]],
            [best[1]],
            s=250,
            facecolors="none",
            edgecolors="red",
            lw=2,
            zorder=5,
            label="best REINFORCE point",
        )
    ax.set_xscale("log")
    ax.set_xlabel("mean MACs per sample (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def accuracy_by_exit_figure(matrix: list[list[Any]], stage_names: list[str], title: str):
    """Guan et al. Figure 4: each classifier's accuracy on the samples exiting at each stage.

    Rows are exit stages, columns classifiers; rows with no samples stay blank.
    """
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(stage_names)), stage_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(stage_names)), [f"exit {n}" for n in stage_names], fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
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
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
