"""One way to fit a stopping rule on cached outputs, and one way to evaluate it.

``fit_rule(outputs, family, <one target>)`` fits any rule family to one target on the
outputs it is given (validation or calibration outputs: never the split you report on),
and returns a fitted rule whose fitted values are attributes (``rule.thresholds``).
``evaluate(rule, outputs)`` returns a typed :class:`Evaluation`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from policycascade.agents.rules import StoppingRule
from policycascade.agents.thresholds import ALL_CRITERIA, ScoreSearch, ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.evaluation import evaluate_rule

TARGETS = ("alpha", "accuracy_drop", "accuracy", "budget")


@dataclass(frozen=True)
class Evaluation:
    """A rule on one split: accuracy, cost and where samples exit."""

    accuracy: float
    mean_cost: float  # per sample, every stage run up to the exit (the outputs' cost unit)
    cost_share: float  # of the most expensive classifier used alone
    exit_distribution: list[float]  # share of samples that exit at each stage
    stage_accuracy: list[float]  # each classifier alone on every sample
    accuracy_by_exit: list[list[float]]  # (exit stage, classifier): NaN for empty rows
    num_samples: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


def evaluate(rule: StoppingRule, outputs: CascadeOutputs) -> Evaluation:
    """Any stopping rule on cached outputs, paying for exactly the stages it runs."""
    if not isinstance(outputs, CascadeOutputs):
        raise TypeError(f"outputs must be CascadeOutputs, got {type(outputs).__name__}")
    if not isinstance(rule, StoppingRule):
        raise TypeError(f"rule must be a stopping rule, got {type(rule).__name__}")
    if rule.num_stages != outputs.num_stages:
        raise ValueError(
            f"rule has {getattr(rule, 'num_stages', None)} stages but outputs have "
            f"{outputs.num_stages}"
        )
    m = evaluate_rule(rule, outputs)
    return Evaluation(
        accuracy=m["accuracy"],
        mean_cost=m["mean_macs"],
        cost_share=m["macs_share"],
        exit_distribution=m["exit_distribution"],
        stage_accuracy=m["stage_accuracy"],
        accuracy_by_exit=m["accuracy_by_exit"],
        num_samples=m["num_samples"],
    )


def fit_rule(
    outputs: CascadeOutputs,
    family: str | StoppingRule = "max-softmax",
    *,
    alpha: float | None = None,
    accuracy_drop: float | None = None,
    accuracy: float | None = None,
    budget: float | None = None,
    temperature: bool = False,
) -> StoppingRule:
    """Fit ``family`` on ``outputs`` to exactly one target.

    - ``family``: a confidence criterion (``max-softmax``, ``entropy``, ``softmax-margin``,
      ``logit-margin``, ``ensemble``), ``class-aware`` (per-class thresholds of max-softmax),
      or any fitted rule, whose stop score is then thresholded per stage.
    - targets: ``alpha`` (best mean reward ``accuracy - alpha * cost share``),
      ``accuracy_drop`` (cheapest rule within that drop of the last classifier's accuracy,
      0.005 = half a point), ``accuracy`` (cheapest rule at least that accurate),
      ``budget`` (most accurate rule whose mean cost is at most this share of the largest
      classifier's).

    For a rule that keeps its promise on new data with a stated probability, use
    :func:`policycascade.certify.certified_fit`.
    """
    if not isinstance(outputs, CascadeOutputs):
        raise TypeError(f"outputs must be CascadeOutputs, got {type(outputs).__name__}")
    given = {
        name: value
        for name, value in zip(TARGETS, (alpha, accuracy_drop, accuracy, budget), strict=True)
        if value is not None
    }
    if len(given) != 1:
        raise ValueError(
            f"give exactly one target of {list(TARGETS)}, got {sorted(given) or 'none'}"
        )
    ((target, value),) = given.items()
    value = _real(target, value)
    search = _search(outputs, family, temperature)
    if target == "alpha":
        return search.for_reward(float(value))
    if target == "accuracy_drop":
        if not 0 <= value < 1:
            raise ValueError(f"accuracy_drop must be in [0, 1), got {value}")
        return search.for_accuracy_drop(float(value))
    if target == "accuracy":
        if not 0 <= value <= 1:
            raise ValueError(f"accuracy must be in [0, 1], got {value}")
        return search.for_accuracy(float(value))
    if not value > 0:
        raise ValueError(f"budget must be a share > 0 of the largest classifier, got {value}")
    return search.for_budget(float(value) * search.reference_macs)


def certify_target(
    outputs: CascadeOutputs,
    family: str | StoppingRule,
    target: dict[str, float],
    delta: float,
    **options: Any,
):
    """``certified_fit`` for a target given as ``fit_rule``'s keyword (one of them).

    An ``alpha`` is a trade-off, not a promise, so it cannot be certified; the accuracy
    drop, the accuracy and the budget can. Returns the :class:`~policycascade.certify.Certified`.
    """
    from policycascade.certify import Target, certified_fit

    makers = {
        "accuracy_drop": Target.accuracy_drop,
        "accuracy": Target.accuracy,
        "budget": Target.budget,
    }
    if len(target) != 1 or next(iter(target)) not in makers:
        raise ValueError(
            f"a guarantee needs one target of {list(makers)} (an alpha is a trade-off, not a "
            f"promise), got {sorted(target)}"
        )
    ((name, value),) = target.items()
    return certified_fit(outputs, makers[name](value), delta, family=family, **options)


def _real(name: str, value: Any) -> float:
    """A finite real number (Python, NumPy or a 0-d tensor), or an error naming ``name``."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def fit_curve(
    outputs: CascadeOutputs,
    family: str | StoppingRule = "max-softmax",
    points: int = 15,
    temperature: bool = False,
) -> list[StoppingRule]:
    """Rules along the family's trade-off curve: the most accurate within log-spaced budgets."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    return _search(outputs, family, temperature).sweep(points)


def _search(outputs: CascadeOutputs, family: str | StoppingRule, temperature: bool):
    """The threshold search of a family on these outputs."""
    if not isinstance(temperature, bool):
        raise TypeError(f"temperature must be True or False, got {temperature!r}")
    if isinstance(family, str):
        if family == "class-aware":
            from policycascade.agents.class_aware import ClassAwareSearch

            return ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs)
        if family not in ALL_CRITERIA:
            raise ValueError(
                f"family must be one of {[*ALL_CRITERIA, 'class-aware']} or a fitted rule, "
                f"got {family!r}"
            )
        free = outputs.costs.with_policy_macs([0] * outputs.num_stages)
        return ThresholdSearch(outputs.probs, outputs.labels, free, family, temperature)
    if not isinstance(family, StoppingRule):
        raise TypeError(
            f"family must be a criterion name or a stopping rule, got {type(family).__name__}"
        )
    if family.num_stages != outputs.num_stages:
        raise ValueError(
            f"family rule has {family.num_stages} stages but outputs have {outputs.num_stages}"
        )
    return ScoreSearch.for_rule(family, outputs.probs, outputs.labels, outputs.costs)
