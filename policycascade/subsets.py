"""Sub-cascades: the subset of a cascade's classifiers whose rule is cheapest on validation.

With K models the best cascade often uses only some of them: Lebovitz et al. build
the Pareto front over every pair and triple of pretrained models. Here every
candidate subset of the cached stages gets its own rule fitted on validation, one
subset is chosen on validation by a stated criterion, and only the chosen one (and
the full cascade, its reference) is reported on test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from policycascade.agents.rules import StoppingRule
from policycascade.agents.thresholds import ScoreSearch, ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule
from policycascade.protocol import Point, macs_saved

SearchFactory = Callable[[CascadeOutputs], ScoreSearch]  # validation outputs -> a rule search


class SubsetCosts(StageCosts):
    """Stage costs of a sub-cascade, normalised by the *full* cascade's most expensive classifier.

    Keeping the full cascade's reference keeps ``macs_share`` and budgets given as a
    share comparable across subsets, also for subsets that drop the largest model.
    """

    def __init__(
        self,
        classifier_macs: list[int],
        policy_macs: list[int] | None,
        alone_macs: list[int],
        reference_macs: int,
    ):
        super().__init__(classifier_macs, policy_macs, alone_macs)
        if reference_macs < max(self.alone_macs):
            raise ValueError(
                f"reference_macs {reference_macs} is below the dearest classifier's "
                f"{max(self.alone_macs)}"
            )
        self._reference_macs = int(reference_macs)

    @property
    def reference_macs(self) -> int:
        """MACs of the full cascade's most expensive classifier used alone."""
        return self._reference_macs

    def with_policy_macs(self, policy_macs: list[int]) -> SubsetCosts:
        """The same classifiers and reference with another stopping rule's per-stage cost."""
        return SubsetCosts(self.classifier_macs, policy_macs, self.alone_macs, self.reference_macs)


def candidate_subsets(num_stages: int, all_subsets: bool = False) -> list[tuple[int, ...]]:
    """Stage subsets to try, each cheapest first; by size, then lexicographic; the full one last.

    By default every subset of >= 2 stages that keeps the last (most expensive)
    classifier, 2^(K-1) - 1 of them: each keeps the cascade's accuracy ceiling.
    ``all_subsets=True`` also tries those without it, every subset of >= 2 stages
    (2^K - K - 1), Lebovitz et al.'s pairs and triples included. A single classifier
    is not a cascade (a cascade has >= 2 stages): ``compare_outputs`` reports each as
    a ``single`` row.
    """
    if num_stages < 2:
        raise ValueError(f"a cascade needs at least 2 stages, got num_stages={num_stages}")
    last = num_stages - 1
    return [
        subset
        for size in range(2, num_stages + 1)
        for subset in itertools.combinations(range(num_stages), size)
        if all_subsets or subset[-1] == last
    ]


def sub_costs(costs: StageCosts, stages: Sequence[int]) -> SubsetCosts:
    """Per-stage costs of the cascade of ``stages`` only, reference kept from ``costs``.

    Independent classifiers cost what they cost alone. Where stages share a trunk
    (the exits of one network: ``alone_macs[t]`` = trunk up to t + head t,
    ``classifier_macs[t]`` = block t + head t), a chosen stage costs the trunk
    blocks since the previous chosen stage plus its own head; the skipped stages'
    heads are not run. Both cases are one formula: head t is read off the costs as
    ``shared(t + 1) - shared(t)``, with ``shared(t)`` = cumulative classifier MACs
    up to t minus ``alone_macs[t]`` (the heads before t).
    """
    stages = _check_stages(stages, costs.num_stages)
    alone = costs.alone_macs
    cumulative = list(itertools.accumulate(costs.classifier_macs))
    shared = [c - a for c, a in zip(cumulative, alone, strict=True)]

    def reused(t: int) -> int:  # MACs of exit t's path that a later exit reuses: its trunk
        return alone[t] - (shared[t + 1] - shared[t])

    macs = [alone[stages[0]]]
    macs += [alone[t] - reused(prev) for prev, t in itertools.pairwise(stages)]
    if any(m <= 0 for m in macs):
        raise ValueError(
            f"stages {list(stages)} cost {macs} MACs: the costs {costs!r} with "
            f"alone_macs={alone} are neither independent classifiers nor exits of one trunk"
        )
    return SubsetCosts(
        macs,
        [costs.policy_macs[t] for t in stages],
        [alone[t] for t in stages],
        costs.reference_macs,
    )


def sub_outputs(outputs: CascadeOutputs, stages: Sequence[int]) -> CascadeOutputs:
    """The cached outputs of the cascade made of ``stages`` only (see :func:`sub_costs`)."""
    stages = _check_stages(stages, outputs.num_stages)
    return CascadeOutputs(
        outputs.probs[:, list(stages)], outputs.labels, sub_costs(outputs.costs, stages)
    )


def check_same_task(
    first: CascadeOutputs, second: CascadeOutputs, names: tuple[str, str] = ("val", "test")
) -> None:
    """Raise ``ValueError`` unless two outputs come from one cascade: stages, classes, costs.

    Rules fitted on one split and reported on another must read the same classifiers'
    softmaxes over the same classes at the same costs.
    """
    for what in ("num_stages", "num_classes"):
        a, b = getattr(first, what), getattr(second, what)
        if a != b:
            raise ValueError(
                f"{names[0]} and {names[1]} must be outputs of one cascade, but {names[0]} has "
                f"{what}={a} and {names[1]} has {what}={b}"
            )
    for what in ("classifier_macs", "alone_macs"):
        a, b = getattr(first.costs, what), getattr(second.costs, what)
        if list(a) != list(b):
            raise ValueError(
                f"{names[0]} and {names[1]} must be outputs of one cascade, but their "
                f"{what} differ: {list(a)} and {list(b)}"
            )


def _check_stages(stages: Sequence[int], num_stages: int) -> tuple[int, ...]:
    stages = tuple(int(t) for t in stages)
    if len(stages) < 2:
        raise ValueError(f"a sub-cascade needs at least 2 stages, got stages={list(stages)}")
    increasing = all(a < b for a, b in itertools.pairwise(stages))
    if not increasing or stages[0] < 0 or stages[-1] >= num_stages:
        raise ValueError(
            f"stages must be strictly increasing indices in [0, {num_stages}), got {list(stages)}"
        )
    return stages


def threshold_search(
    criterion: str = "max-softmax", temperature_scaling: bool = False
) -> SearchFactory:
    """A :data:`SearchFactory` for one confidence criterion's threshold rules."""

    def search(outputs: CascadeOutputs) -> ScoreSearch:
        free = outputs.costs.with_policy_macs([0] * outputs.num_stages)
        return ThresholdSearch(outputs.probs, outputs.labels, free, criterion, temperature_scaling)

    return search


@dataclass(frozen=True)
class SubsetScore:
    """One subset's rule fitted to the target on validation, and its validation curve."""

    stages: tuple[int, ...]
    names: tuple[str, ...]
    val_accuracy: float  # of the rule fitted to the target
    val_mean_macs: float
    feasible: bool  # reaches the target accuracy / stays within the budget on validation
    val_curve: list[Point]  # (accuracy, mean MACs) of the sweep and the fitted rule
    rule: StoppingRule = field(repr=False, compare=False)
    sweep: list[StoppingRule] = field(repr=False, compare=False)  # rules of the curve

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the rule left out)."""
        return {
            "stages": list(self.stages),
            "names": list(self.names),
            "val_accuracy": self.val_accuracy,
            "val_mean_macs": self.val_mean_macs,
            "feasible": self.feasible,
            "val_curve": [list(p) for p in self.val_curve],
        }


@dataclass(frozen=True)
class SubsetChoice:
    """Every subset's validation score, the chosen subset and the full cascade on test.

    ``macs_saved`` is the share of the full cascade's test MACs that the chosen
    subset's test curve saves at the accuracy the full cascade's fitted rule reaches
    on test (:func:`policycascade.protocol.macs_saved`; None where the chosen curve
    never reaches it, negative where it costs more).
    """

    target: str  # "accuracy" (fewest MACs reaching it) or "budget" (most accurate within it)
    target_value: float  # validation accuracy or mean MACs per sample
    subsets: list[SubsetScore]  # every candidate, in candidate order
    best: SubsetScore
    full: SubsetScore
    test: dict[str, Any]  # evaluate_rule of the chosen subset's fitted rule on test
    full_test: dict[str, Any]  # the same for the full cascade
    test_curve: list[Point]
    full_test_curve: list[Point]
    macs_saved: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "target": self.target,
            "target_value": self.target_value,
            "best": self.best.as_dict(),
            "full": self.full.as_dict(),
            "subsets": [s.as_dict() for s in self.subsets],
            "test": self.test,
            "full_test": self.full_test,
            "test_curve": [list(p) for p in self.test_curve],
            "full_test_curve": [list(p) for p in self.full_test_curve],
            "macs_saved": self.macs_saved,
        }


def best_subset(
    val: CascadeOutputs,
    test: CascadeOutputs,
    search: str | SearchFactory = "max-softmax",
    target_accuracy: float | None = None,
    macs_budget: float | None = None,
    subsets: Sequence[Sequence[int]] | None = None,
    stage_names: Sequence[str] | None = None,
    sweep_points: int = 15,
) -> SubsetChoice:
    """Fit a rule on every subset's validation outputs, choose one on validation, report it on test.

    Criterion (validation only): with a target accuracy, the subset whose rule
    fitted by ``for_accuracy`` reaches it with the fewest mean MACs; with
    ``macs_budget``, the subset whose rule fitted by ``for_budget`` is most accurate
    within it. Subsets that miss the target rank below those that meet it (then by
    accuracy); ties go to fewer stages, then to the earlier candidate.

    Args:
        val: validation outputs of the full cascade (rules are fitted here).
        test: test outputs of the same cascade (reported only).
        search: a confidence criterion (``"max-softmax"`` ...) or a function from
            validation outputs to a :class:`ScoreSearch`.
        target_accuracy: validation accuracy to reach; default, and used when
            neither target is given: the full cascade's last classifier's.
        macs_budget: mean MACs per sample instead of an accuracy target.
        subsets: stage subsets to try; default :func:`candidate_subsets` (K).
            The full cascade is always added as the reference.
        stage_names: one name per stage of the full cascade (default ``stage<t>``).
        sweep_points: points of each subset's curve (``ScoreSearch.sweep``).
    """
    check_same_task(val, test, ("val", "test"))
    k = val.num_stages
    target, value = _target(val, target_accuracy, macs_budget)
    names = list(stage_names) if stage_names is not None else [f"stage{t}" for t in range(k)]
    if len(names) != k:
        raise ValueError(f"stage_names needs one name per stage ({k}), got {len(names)}: {names}")
    make_search = threshold_search(search) if isinstance(search, str) else search
    candidates = _candidates(subsets, k)
    scores = [
        _score(stages, names, make_search, sub_outputs(val, stages), target, value, sweep_points)
        for stages in candidates
    ]
    best = max(scores, key=lambda score: _rank(score, target))
    full = scores[candidates.index(tuple(range(k)))]
    best_test, best_curve = _on_test(best, test)
    full_test, full_curve = _on_test(full, test)
    return SubsetChoice(
        target=target,
        target_value=float(value),
        subsets=scores,
        best=best,
        full=full,
        test=best_test,
        full_test=full_test,
        test_curve=best_curve,
        full_test_curve=full_curve,
        macs_saved=macs_saved(best_curve, full_curve, full_test["accuracy"]),
    )


def _candidates(subsets: Sequence[Sequence[int]] | None, k: int) -> list[tuple[int, ...]]:
    """The subsets to try (default :func:`candidate_subsets`), checked, the full cascade added."""
    full_stages = tuple(range(k))
    candidates = [_check_stages(s, k) for s in (subsets or candidate_subsets(k))]
    if full_stages not in candidates:
        candidates.append(full_stages)
    return candidates


def _target(
    val: CascadeOutputs, target_accuracy: float | None, macs_budget: float | None
) -> tuple[str, float]:
    """The criterion and its value: ``("budget", macs_budget)`` or ``("accuracy", value)``.

    The accuracy defaults to the last classifier's on validation.
    """
    if target_accuracy is not None and macs_budget is not None:
        raise ValueError("give target_accuracy or macs_budget, not both")
    if macs_budget is not None and not macs_budget > 0:
        raise ValueError(f"macs_budget must be > 0, got {macs_budget}")
    if macs_budget is not None:
        return "budget", float(macs_budget)
    if target_accuracy is None:
        return "accuracy", float((val.probs[:, -1].argmax(-1) == val.labels).double().mean())
    return "accuracy", target_accuracy


def _rank(score: SubsetScore, target: str) -> tuple:
    """Sort key of the criterion: feasible first, then the target's quality, then fewer stages."""
    if target == "accuracy":
        quality = -score.val_mean_macs if score.feasible else score.val_accuracy
        return (score.feasible, quality, score.val_accuracy, -len(score.stages))
    quality = score.val_accuracy if score.feasible else -score.val_mean_macs
    return (score.feasible, quality, -score.val_mean_macs, -len(score.stages))


def _score(
    stages: tuple[int, ...],
    names: list[str],
    make_search: SearchFactory,
    val: CascadeOutputs,
    target: str,
    value: float,
    sweep_points: int,
) -> SubsetScore:
    """Fit one subset's rule to the target, and its curve, on its validation outputs."""
    search = make_search(val)
    rule = search.for_accuracy(value) if target == "accuracy" else search.for_budget(value)
    sweep = search.sweep(sweep_points)
    curve = [_point(evaluate_rule(r, val)) for r in [*sweep, rule]]
    acc, macs = curve[-1]
    feasible = acc >= value - 1e-12 if target == "accuracy" else macs <= value + 1e-9
    return SubsetScore(
        stages, tuple(names[t] for t in stages), acc, macs, feasible, curve, rule, sweep
    )


def _point(metrics: dict[str, Any]) -> Point:
    return metrics["accuracy"], metrics["mean_macs"]


def _on_test(score: SubsetScore, test: CascadeOutputs) -> tuple[dict[str, Any], list[Point]]:
    """The subset's fitted rule on test, and its curve: the validation sweep's rules on test."""
    outputs = sub_outputs(test, score.stages)
    result = evaluate_rule(score.rule, outputs)
    curve = [_point(evaluate_rule(r, outputs)) for r in score.sweep]
    return result, [*curve, _point(result)]
