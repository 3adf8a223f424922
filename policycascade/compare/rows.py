"""The comparison's typed rows: one policy at one operating point on one run's test split."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
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
    "certified",  # a rule certified on validation to keep an accuracy drop (Learn-then-Test)
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
    config: str = ""  # config_key of the run's configuration ("" where unknown)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


@dataclass
class Aggregate:
    """Mean and standard deviation over the seeds of one configuration, at one policy and point.

    ``group`` names the configuration (data set, who trained the classifiers, alpha and
    :func:`config_key`); ``run_names`` are the runs averaged, one per seed.
    """

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
    group: str = ""
    config: str = ""
    run_names: list[str] = field(default_factory=list)


# Options that say where and how a run ran, not what it trained: runs that differ only in
# these (and in the seed) are seeds of one configuration.
EXECUTION_OPTIONS = (
    "seed",
    "logdir",
    "data_dir",
    "download",
    "device",
    "threads",
    "processes",
    "compile",
    "deterministic",
    "channels_last",
    "resume",
)


def config_key(config: Any) -> str:
    """A short fingerprint of a run's configuration, the same for every seed of it.

    ``config`` is a ``TrainConfig`` or its ``to_dict()``. Every training option counts
    (data set or env, agent, classifier family and training, the agent's section) except
    the seed, where the run ran (:data:`EXECUTION_OPTIONS`) and alpha (rows carry it).
    """
    values = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(values, dict):
        raise TypeError(
            f"config must be a TrainConfig or its to_dict(), got {type(values).__name__}"
        )
    kept = {}
    for key, value in values.items():
        if key in EXECUTION_OPTIONS:
            continue
        if isinstance(value, dict):  # an agent's section
            value = {k: v for k, v in value.items() if k != "alpha"}
        kept[key] = value
    text = json.dumps(kept, sort_keys=True, default=str)
    agent = str(values.get("agent", "run"))
    return f"{agent}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


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


def group_label(row: Row) -> str:
    """The configuration a row's run belongs to: data set, classifiers' trainer, alpha, config."""
    alpha = "" if row.alpha is None else f" a={row.alpha:g}"
    config = f" [{row.config}]" if row.config else ""
    return f"{row.dataset} {row.trained_by}{alpha}{config}"


def _point_key(row: Row) -> tuple:
    """(configuration group, policy, kind, point): the rows that are seeds of one number."""
    return (row.dataset, row.config, row.trained_by, row.alpha, row.policy, row.kind, row.point)


def check_distinct_runs(rows: list[Row]) -> None:
    """Raise ``ValueError`` naming the runs if one run, or one seed of a configuration, repeats.

    Averaging a run with itself (or two runs of one configuration and seed) would report
    a spread of 0 over "seeds" that are one.
    """
    seen_runs: dict[tuple, Row] = {}
    seen_seeds: dict[tuple, Row] = {}
    for row in rows:
        point = (
            row.dataset,
            row.config,
            row.trained_by,
            row.alpha,
            row.policy,
            row.kind,
            row.point,
        )
        first = seen_runs.setdefault((*point, row.run), row)
        if first is not row:
            raise ValueError(
                f"run {row.run!r} is given twice (its {row.policy} {row.point} row repeats): "
                "give each run once"
            )
        first = seen_seeds.setdefault((*point, row.seed), row)
        if first is not row:
            same = "configuration" if row.config else "data set, trainer and alpha"
            raise ValueError(
                f"runs {first.run!r} and {row.run!r} have the same {same} "
                f"({group_label(row)}) and the same seed {row.seed}: averaging them would "
                "count one seed twice; give one of them"
            )


def aggregate(rows: list[Row]) -> list[Aggregate]:
    """Mean and standard deviation over seeds, per configuration, policy and operating point.

    Rows are grouped by (data set, :func:`config_key`, who trained the classifiers, alpha)
    and then by (policy, kind, point): runs of different configurations are never averaged
    together. A run given twice, or two runs of one configuration with one seed, raise
    ``ValueError`` (:func:`check_distinct_runs`).
    """
    check_distinct_runs(rows)
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[_point_key(row)].append(row)
    out = []
    for (dataset, config, trained_by, alpha, policy, kind, point), members in groups.items():
        stats = {}
        for key in ("accuracy", "mean_macs", "macs_share"):
            values = np.array([getattr(m, key) for m in members], dtype=float)
            stats[key] = float(values.mean())
            stats[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(
            Aggregate(
                dataset,
                trained_by,
                policy,
                kind,
                point,
                alpha,
                len(members),
                **stats,
                group=group_label(members[0]),
                config=config,
                run_names=[m.run for m in members],
            )
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
    "config",
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
