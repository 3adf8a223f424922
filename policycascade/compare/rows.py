"""The comparison's typed rows: one policy at one operating point on one run's test split."""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# What a row's policy is, so that no code has to guess it from a name:
KINDS = (
    "own",  # the run's own stopping rule: the learned policy, or LtC's thresholds
    "curve",  # a rule fitted on validation along its trade-off curve (sweep, eps, budget)
    "matched",  # a rule fitted to one of the run's own operating points (accuracy, MACs, reward)
    "random",  # stopping at random with the own rule's exit distribution (input-blind)
    "oracle",  # exit at the first right classifier: the bound for these classifiers
    "single",  # one classifier alone
)


@dataclass
class Row:
    """One policy at one operating point, measured on a run's test split."""

    dataset: str
    run: str
    seed: int
    trained_by: str  # who trained the classifiers: reinforce, reinforce-frozen, ltc, reference
    policy: str  # e.g. reinforce, max-softmax, learned-score, random, oracle, single
    kind: str  # one of KINDS
    point: str  # the operating point's label
    alpha: float | None
    accuracy: float
    mean_macs: float
    macs_share: float
    exit_distribution: list[float]
    stage_accuracy: list[float]
    accuracy_by_exit: list[list[float]] = field(repr=False)
    num_samples: int = 0
    val_accuracy: float | None = None
    val_mean_macs: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


@dataclass
class Aggregate:
    """Mean and standard deviation over seeds of one (dataset, classifiers, policy, point)."""

    dataset: str
    trained_by: str
    policy: str
    kind: str
    point: str
    alpha: float | None
    runs: int
    accuracy: float
    accuracy_std: float
    mean_macs: float
    mean_macs_std: float
    macs_share: float
    macs_share_std: float


def make_row(
    meta: dict[str, Any],
    policy: str,
    kind: str,
    point: str,
    test: dict[str, Any],
    val: dict[str, Any] | None = None,
) -> Row:
    """A row from ``evaluate_exits``-style metrics on test (and on validation, if any)."""
    return Row(
        **meta,
        policy=policy,
        kind=kind,
        point=point,
        accuracy=test["accuracy"],
        mean_macs=test["mean_macs"],
        macs_share=test["macs_share"],
        exit_distribution=test["exit_distribution"],
        stage_accuracy=test["stage_accuracy"],
        accuracy_by_exit=test["accuracy_by_exit"],
        num_samples=test["num_samples"],
        val_accuracy=None if val is None else val["accuracy"],
        val_mean_macs=None if val is None else val["mean_macs"],
    )


def aggregate(rows: list[Row]) -> list[Aggregate]:
    """Mean and standard deviation over seeds per (dataset, classifiers, policy, point, alpha)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.dataset, row.trained_by, row.policy, row.kind, row.point, row.alpha)].append(
            row
        )
    out = []
    for (dataset, trained_by, policy, kind, point, alpha), members in groups.items():
        stats = {}
        for key in ("accuracy", "mean_macs", "macs_share"):
            values = np.array([getattr(m, key) for m in members], dtype=float)
            stats[key] = float(values.mean())
            stats[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(
            Aggregate(dataset, trained_by, policy, kind, point, alpha, len(members), **stats)
        )
    return out


CSV_COLUMNS = (
    "dataset",
    "run",
    "seed",
    "trained_by",
    "policy",
    "kind",
    "point",
    "alpha",
    "accuracy",
    "mean_macs",
    "macs_share",
    "val_accuracy",
    "val_mean_macs",
)


def write_csv(path: Path, rows: list[Row]) -> None:
    """One line per (run, policy, operating point); list metrics become one column per stage.

    Runs of cascades with fewer stages leave the extra stage columns empty.
    """
    k = max(len(row.exit_distribution) for row in rows)
    columns = list(CSV_COLUMNS) + [f"exit_share_stage{t}" for t in range(k)]
    columns += [f"stage_accuracy_stage{t}" for t in range(k)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            flat = {c: getattr(row, c) for c in CSV_COLUMNS}
            flat.update({f"exit_share_stage{t}": v for t, v in enumerate(row.exit_distribution)})
            flat.update({f"stage_accuracy_stage{t}": v for t, v in enumerate(row.stage_accuracy)})
            writer.writerow(flat)
