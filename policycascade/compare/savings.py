"""What a run's own policy saves: against rules on its classifiers and against the largest alone.

All curves are test-split operating points of rules fitted on validation; only their
Pareto envelopes count (``policycascade.protocol``). The rule family (criterion) compared
with is the one with the best validation curve, so nothing is chosen on test.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from policycascade.agents.thresholds import ALL_CRITERIA
from policycascade.compare.reference import REFERENCE
from policycascade.compare.rows import Row
from policycascade.protocol import macs_at_accuracy, macs_saved, normalised_area

HALF_POINT = 0.005
CLASS_AWARE_PREFIX = "class-aware "  # rows of the per-class threshold family


def is_threshold_rule(row: Row) -> bool:
    """A confidence-threshold rule's fitted point (any criterion, temperature-scaled too)."""
    family = row.policy.removesuffix("+T").removeprefix(CLASS_AWARE_PREFIX)
    return row.kind in ("curve", "matched") and family in ALL_CRITERIA


@dataclass
class RunSavings:
    """One run's own policy against the envelope of threshold rules on some classifiers."""

    against: str  # whose classifiers the rules run on: "own classifiers" or "reference"
    rule_criterion: str  # the rule family chosen on validation (largest validation area)
    run: str
    dataset: str
    seed: int
    trained_by: str
    alpha: float | None
    accuracy: float
    mean_macs: float
    rule_macs_at_equal_accuracy: float | None  # fewest MACs of any rule envelope at that accuracy
    macs_saved_vs_rules: float | None  # 1 - own MACs / rule MACs at the own test accuracy
    largest_accuracy: float  # the most expensive classifier of ``against``, alone, on test
    macs_saved_vs_largest: float
    curve_saved_at_largest: float | None  # own curve vs rule envelope at the largest's accuracy
    curve_saved_below_largest: float | None  # the same half a point lower
    own_area: float | None  # normalised area of the own curve (0 cheapest, 1 oracle)
    rules_area: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def best_criterion_on_validation(members: list[Row]) -> str:
    """The threshold-rule family whose *validation* curve has the largest area.

    Choosing the criterion on test (the envelope of every family's test points) would
    tune on the test split; all families are ranked on one common MAC range.
    """
    families: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in members:
        if is_threshold_rule(r) and r.val_accuracy is not None:
            families[r.policy].append((r.val_accuracy, r.val_mean_macs))
    points = [p for family in families.values() for p in family]
    low_acc = min(a for a, _ in points)
    low_macs, high_macs = min(m for _, m in points), max(m for _, m in points)
    if high_macs <= low_macs or low_acc >= 1.0:
        return min(families)

    def area(family: list[tuple[float, float]]) -> float:
        return normalised_area(family, (low_acc, low_macs), (1.0, low_macs), high_macs)

    return max(sorted(families), key=lambda name: area(families[name]))


def run_savings(rows: list[Row]) -> list[RunSavings]:
    """Per run with an own policy: against rules on its classifiers, and on the reference's."""
    by_run: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_run[row.run].append(row)
    out = []
    for members in by_run.values():
        own = next((r for r in members if r.kind == "own"), None)
        if own is None:
            continue
        mine = [r for r in members if r.trained_by == own.trained_by]
        out.append(_savings(own, mine, mine, "own classifiers"))
        reference = [r for r in members if r.trained_by == REFERENCE]
        if reference:
            out.append(_savings(own, mine, reference, REFERENCE))
    return out


def _savings(own: Row, mine: list[Row], members: list[Row], against: str) -> RunSavings:
    """``own`` (its score curve from ``mine``) against the rules and classifiers of ``members``."""
    singles = [r for r in members if r.kind == "single"]
    largest = max(singles, key=lambda r: r.mean_macs)
    cheapest = min(singles, key=lambda r: r.mean_macs)
    oracle = next(r for r in members if r.kind == "oracle")
    criterion = best_criterion_on_validation(members)
    rules = [(r.accuracy, r.mean_macs) for r in members if r.policy == criterion]
    score = f"{own.trained_by} score"
    own_curve = [(own.accuracy, own.mean_macs)] + [
        (r.accuracy, r.mean_macs) for r in mine if r.policy == score
    ]
    rule_macs = macs_at_accuracy(rules, own.accuracy)
    area_args = ((cheapest.accuracy, cheapest.mean_macs), (oracle.accuracy, oracle.mean_macs))
    can_area = oracle.accuracy > cheapest.accuracy and largest.mean_macs > cheapest.mean_macs
    return RunSavings(
        against=against,
        rule_criterion=criterion,
        run=own.run,
        dataset=own.dataset,
        seed=own.seed,
        trained_by=own.trained_by,
        alpha=own.alpha,
        accuracy=own.accuracy,
        mean_macs=own.mean_macs,
        rule_macs_at_equal_accuracy=rule_macs,
        macs_saved_vs_rules=None if rule_macs is None else 1.0 - own.mean_macs / rule_macs,
        largest_accuracy=largest.accuracy,
        macs_saved_vs_largest=1.0 - own.mean_macs / largest.mean_macs,
        curve_saved_at_largest=macs_saved(own_curve, rules, largest.accuracy),
        curve_saved_below_largest=macs_saved(own_curve, rules, largest.accuracy - HALF_POINT),
        own_area=normalised_area(own_curve, *area_args, largest.mean_macs) if can_area else None,
        rules_area=normalised_area(rules, *area_args, largest.mean_macs) if can_area else None,
    )
