"""Every policy on one cascade's cached outputs: rules fitted on validation, reported on test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from policycascade.agents.rules import StoppingRule
from policycascade.agents.thresholds import (
    ALL_CRITERIA,
    CRITERIA,
    ScoreSearch,
    ThresholdSearch,
    oracle_exits,
    random_exits,
    shared_stop_scores,
)
from policycascade.cascade import CascadeOutputs
from policycascade.compare.rows import Row, make_row
from policycascade.evaluation import evaluate_exits, evaluate_rule

DEFAULT_EPSILONS = (0.0, 0.005, 0.01, 0.02)
DEFAULT_BUDGETS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class Matched:
    """A learned operating point that rules are fitted to: by accuracy, by MACs and by reward."""

    label: str
    val_accuracy: float
    val_mean_macs: float
    exit_distribution: list[float]
    alpha: float | None = None


@dataclass(frozen=True)
class CompareOptions:
    """Which rules to fit and where (every fit uses the validation split)."""

    criteria: tuple[str, ...] = CRITERIA
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS  # accuracy drops below the last classifier
    budget_shares: tuple[float, ...] = DEFAULT_BUDGETS  # MACs budgets, share of the largest
    temperature: bool = False  # also max-softmax with per-stage temperature scaling
    sweep_points: int = 15  # operating points per rule along its trade-off curve
    class_aware: bool = False  # also max-softmax thresholds per stage and predicted class
    # (epsilon, delta): rules certified to lose at most epsilon against the largest
    # classifier with probability >= 1 - delta over the validation (calibration) draw
    guarantees: tuple[tuple[float, float], ...] = ()

    def validate(self) -> CompareOptions:
        """Raise a TypeError/ValueError naming the first bad argument."""
        criteria = _sequence("criteria", self.criteria, str)
        unknown = [c for c in criteria if c not in ALL_CRITERIA]
        if unknown or not criteria:
            raise ValueError(f"criteria must be among {list(ALL_CRITERIA)}, got {list(criteria)}")
        epsilons = _sequence("epsilons", self.epsilons, float)
        if any(not (0 <= e < 1) for e in epsilons):
            raise ValueError(f"epsilons must be in [0, 1), got {list(epsilons)}")
        budgets = _sequence("budget_shares", self.budget_shares, float)
        if any(not (math.isfinite(b) and b > 0) for b in budgets):
            raise ValueError(f"budget_shares must be > 0, got {list(budgets)}")
        for name in ("temperature", "class_aware"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        guarantees = _sequence("guarantees", self.guarantees, tuple)
        for pair in guarantees:
            if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair):
                raise TypeError(f"guarantees must hold (epsilon, delta) pairs, got {pair!r}")
            if not (0 <= pair[0] < 1 and 0 < pair[1] < 1):
                raise ValueError(
                    f"a guarantee needs epsilon in [0, 1) and delta in (0, 1), got {pair}"
                )
        if isinstance(self.sweep_points, bool) or not (
            isinstance(self.sweep_points, int) and self.sweep_points >= 2
        ):
            raise ValueError(f"sweep_points must be an integer >= 2, got {self.sweep_points!r}")
        return self


def _sequence(name: str, values: Any, kind: type) -> tuple:
    """``values`` as a tuple of ``kind`` without repeats, or an error naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list or tuple, got {values!r}")
    for value in values:
        numeric = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (numeric or (kind is not float and isinstance(value, kind))):
            raise TypeError(f"{name} must hold {kind.__name__} values, got {value!r}")
    repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{name} repeats {repeated}: give each value once")
    return tuple(values)


def fitted_points(
    search: ScoreSearch,
    options: CompareOptions,
    matched: Sequence[Matched] = (),
) -> list[tuple[str, str, StoppingRule]]:
    """(kind, point, rule) for every operating point fitted on the search's validation outputs."""
    ref = search.reference_macs
    points = [
        ("curve", f"sweep {i:02d}", r) for i, r in enumerate(search.sweep(options.sweep_points))
    ]
    points += [("curve", f"eps={e:g}", search.for_accuracy_drop(e)) for e in options.epsilons]
    points += [
        ("curve", f"budget={b:g}", search.for_budget(b * ref)) for b in options.budget_shares
    ]
    for m in matched:
        points.append(("matched", f"match-accuracy {m.label}", search.for_accuracy(m.val_accuracy)))
        points.append(("matched", f"match-macs {m.label}", search.for_budget(m.val_mean_macs)))
        if m.alpha is not None:  # the rule with the best reward at the policy's alpha
            points.append(("matched", f"reward {m.label}", search.for_reward(m.alpha)))
    return points


def rule_rows(
    name: str,
    search: ScoreSearch,
    val: CascadeOutputs,
    test: CascadeOutputs,
    options: CompareOptions,
    matched: Sequence[Matched],
    meta: dict[str, Any],
) -> list[Row]:
    """One row per fitted operating point of one rule family."""
    memo: dict = {}  # the family's confidences on val and test, computed once

    def evaluate(rule: StoppingRule, outputs: CascadeOutputs) -> dict[str, Any]:
        return evaluate_rule(rule, outputs, shared_stop_scores(rule, outputs.probs, memo))

    return [
        make_row(meta, name, kind, point, evaluate(rule, test), evaluate(rule, val))
        for kind, point, rule in fitted_points(search, options, matched)
    ]


def compare_outputs(
    val: CascadeOutputs,
    test: CascadeOutputs,
    stage_names: Sequence[str],
    options: CompareOptions | None = None,
    matched: Sequence[Matched] = (),
    **meta: Any,
) -> list[Row]:
    """Rule-based policies and reference points on one cascade's cached outputs (no training).

    Threshold rules of every criterion are fitted on ``val`` and reported on ``test``
    (see :func:`fitted_points`); then random stopping matched to each ``matched``
    point's exits, the oracle and each classifier alone. ``meta`` (dataset, run,
    seed, trained_by, alpha) labels the rows.
    """
    options = (options or CompareOptions()).validate()
    if val.num_stages != test.num_stages:
        raise ValueError(f"val has {val.num_stages} stages but test has {test.num_stages}")
    names = list(stage_names)
    if len(names) != test.num_stages:
        raise ValueError(
            f"stage_names needs one name per stage ({test.num_stages}), got {len(names)}: {names}"
        )
    meta = {
        "dataset": "custom",
        "run": "outputs",
        "seed": 0,
        "trained_by": "user",
        "alpha": None,
        **meta,
    }
    k = test.num_stages
    free = test.costs.with_policy_macs([0] * k)
    val, test = val.with_costs(free), test.with_costs(free)
    rows = []
    variants = [(c, False) for c in options.criteria] + (
        [("max-softmax", True)] if options.temperature else []
    )
    for criterion, scaled in variants:
        search = ThresholdSearch(val.probs, val.labels, free, criterion, scaled)
        rows += rule_rows(search.template.name, search, val, test, options, matched, meta)
    if options.class_aware:
        from policycascade.agents.class_aware import ClassAwareSearch

        search = ClassAwareSearch(val.probs, val.labels, free, "max-softmax")
        name = "class-aware max-softmax"
        rows += rule_rows(name, search, val, test, options, matched, meta)
    rows += certified_rows(val, test, options, meta)
    generator = torch.Generator().manual_seed(0)
    for m in matched:
        exits = random_exits(test.num_samples, m.exit_distribution, generator)
        rows.append(
            make_row(meta, "random", "random", f"matched {m.label}", evaluate_exits(test, exits))
        )
    oracle = evaluate_exits(test, oracle_exits(test.probs, test.labels))
    rows.append(make_row(meta, "oracle", "oracle", "bound", oracle))
    rows += single_rows(test, names, meta)
    return rows


def certified_rows(
    val: CascadeOutputs, test: CascadeOutputs, options: CompareOptions, meta: dict[str, Any]
) -> list[Row]:
    """Rules of each criterion certified on ``val`` at each (epsilon, delta), scored on test.

    The point names the guarantee, the bound and the calibration size, or says that the
    target could not be certified (the rule then falls back to the largest classifier).
    """
    from policycascade.fitting import certify_target

    rows = []
    for epsilon, delta in options.guarantees:
        for criterion in (c for c in options.criteria if c != "ensemble"):
            fit = certify_target(val, criterion, {"accuracy_drop": epsilon}, delta)
            status = "" if fit.certified else ", not certifiable: largest classifier"
            point = f"eps={epsilon:g} delta={delta:g} ({fit.bound}, n={fit.num_samples}{status})"
            rows.append(
                make_row(
                    meta,
                    criterion,
                    "certified",
                    point,
                    evaluate_rule(fit.rule, test),
                    evaluate_rule(fit.rule, val),
                )
            )
    return rows


def single_rows(test: CascadeOutputs, names: Sequence[str], meta: dict[str, Any]) -> list[Row]:
    """Each classifier alone, at its own MACs (no earlier stage, no policy)."""
    costs, k = test.costs, test.num_stages
    rows = []
    for t, name in enumerate(names):
        single = evaluate_exits(test, torch.full((test.num_samples,), t, dtype=torch.int64))
        single["mean_macs"] = float(costs.alone_macs[t])
        single["macs_share"] = costs.alone_macs[t] / costs.reference_macs
        single["accuracy"] = single["stage_accuracy"][t]
        single["exit_distribution"] = [float(s == t) for s in range(k)]
        rows.append(make_row(meta, "single", "single", name, single))
    return rows
