"""Paths of stopping rules for Learn-then-Test, the losses they incur, and fixed-sequence tests.

A path runs from a surely safe rule to riskier, cheaper ones (more accurate ones for a
budget). ``split_path`` fits it with the existing threshold search on samples kept apart
from the test; ``fixed_path`` shares one confidence threshold across stages on a grid fixed
in advance. ``Family`` holds a thresholdable scored rule's scores, correctness and costs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policycascade.agents.rules import StoppingRule, first_stop
from policycascade.agents.thresholds import (
    CRITERIA,
    ENSEMBLE,
    ScoreSearch,
    ShiftedRule,
    ThresholdRule,
    stage_answers_of,
)
from policycascade.certify_bounds import p_values

KINDS = ("drop", "accuracy", "budget")
# Path targets around the requested one (accuracy points; share of the budget for budgets).
ACCURACY_GRID = (-0.01, -0.005, -0.0025, 0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03)
BUDGET_GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05)
FIXED_PATH_LEVELS = 1.0 - np.logspace(-6, 0, 49)  # shared confidence thresholds, safe first
# docs/certify.md: betting keeps the most savings on the paired loss (the cost loss is also
# continuous, where no exact test applies); for a 0/1 loss the binomial test is UMP.
DEFAULT_BOUND = {"drop": "betting", "accuracy": "exact", "budget": "betting"}
FIXED_FAMILIES = ("max-softmax", "softmax-margin")  # confidences in [0, 1]: a grid fits all


@dataclass(frozen=True)
class Target:
    """What to certify: an accuracy drop vs the largest classifier, an accuracy, or a budget.

    ``drop``: accuracy(largest) - accuracy(rule) <= value (paired loss in {-1, 0, 1});
    ``accuracy``: accuracy(rule) >= value; ``budget``: mean MACs <= value * largest's MACs
    (label-free: unlabelled samples count).
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"target kind must be one of {list(KINDS)}, got {self.kind!r}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"target value must be a number, got {v!r}")
        if self.kind == "drop" and not 0 <= v < 1:
            raise ValueError(f"epsilon must be in [0, 1), got {v}")
        if self.kind == "accuracy" and not 0 < v <= 1:
            raise ValueError(f"accuracy must be in (0, 1], got {v}")
        if self.kind == "budget" and not (math.isfinite(v) and v > 0):
            raise ValueError(f"budget must be a finite share > 0, got {v}")

    @classmethod
    def accuracy_drop(cls, epsilon: float) -> Target:
        """Accuracy at most ``epsilon`` below the largest classifier's."""
        return cls("drop", float(epsilon))

    @classmethod
    def accuracy(cls, accuracy: float) -> Target:
        """Accuracy at least ``accuracy``."""
        return cls("accuracy", float(accuracy))

    @classmethod
    def budget(cls, share: float) -> Target:
        """Mean MACs at most ``share`` of the largest classifier's."""
        return cls("budget", float(share))

    def __str__(self) -> str:
        return {"drop": "drop<=", "accuracy": "accuracy>=", "budget": "macs_share<="}[
            self.kind
        ] + f"{self.value:g}"


@dataclass
class Family:
    """A thresholdable scored rule on one set of samples: stop at stage t where score_t >= x_t."""

    scores: torch.Tensor  # (sample, K - 1) float64 stop scores
    correct: torch.Tensor | None  # (sample, K) float64: the answer at each stage is right
    cumulative: torch.Tensor  # (K,) float64 MACs of exiting at each stage
    reference_macs: float
    make_rule: Any  # thresholds (K - 1 floats) -> StoppingRule

    @classmethod
    def of(
        cls, family: str | StoppingRule, probs: torch.Tensor, labels: torch.Tensor | None, costs
    ) -> Family:
        """Scores, correctness and costs of a criterion's thresholds or any rule's offsets."""
        probs = probs.cpu()
        k = probs.shape[1]
        if isinstance(family, str):
            if family not in CRITERIA:
                raise ValueError(
                    f"family must be one of {list(CRITERIA)} or a rule, got {family!r}"
                )
            base = ThresholdRule(family, [math.inf] * (k - 1))
            scores = base.confidences(probs)

            def make_rule(x: list[float]) -> StoppingRule:
                return ThresholdRule(family, [float(v) for v in x])

        elif isinstance(family, StoppingRule):
            base = family
            scores = family.stop_scores(probs)

            def make_rule(x: list[float]) -> StoppingRule:
                return ShiftedRule(family, [float(v) for v in x])

        else:
            raise TypeError(f"family must be a criterion name or a StoppingRule, got {family!r}")
        costs = costs.with_policy_macs(base.policy_macs())
        correct = None
        if labels is not None:
            answers = stage_answers_of(base, probs)
            answers = probs.argmax(-1) if answers is None else answers.cpu()
            correct = (answers == labels.cpu().unsqueeze(1)).double()
        return cls(
            scores.cpu().double(),
            correct,
            torch.tensor(costs.cumulative_macs, dtype=torch.float64),
            float(costs.reference_macs),
            make_rule,
        )

    def subset(self, index: torch.Tensor) -> Family:
        """The same family on some of its samples."""
        correct = None if self.correct is None else self.correct[index]
        return Family(
            self.scores[index], correct, self.cumulative, self.reference_macs, self.make_rule
        )

    def search(self) -> ScoreSearch:
        """The existing coordinate search over thresholds, on these (labelled) samples."""
        if self.correct is None:
            raise ValueError("fitting a path needs labelled samples")
        # ScoreSearch reads correctness as answers == labels: right answers become class 0
        return ScoreSearch(  # its candidate ranking is vectorised (lexicographic_argmax)
            self.scores,
            torch.zeros(len(self.scores), self.num_stages, 1),
            torch.zeros(len(self.scores), dtype=torch.int64),
            _Costs(self.cumulative, self.reference_macs),
            self.make_rule,
            answers=(1 - self.correct).long(),
        )

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.cumulative)

    def exits(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Exit stage of every sample under each of M threshold vectors: (M, sample)."""
        m = thresholds.shape[0]
        full = torch.cat([thresholds, torch.full((m, 1), -math.inf, dtype=torch.float64)], 1)
        scores = torch.cat([self.scores, self.scores.new_zeros(len(self.scores), 1)], 1)
        stop = scores.unsqueeze(1) >= full.unsqueeze(0)  # (sample, M, K)
        return first_stop(stop.reshape(-1, stop.shape[-1])).view(-1, m).T

    def losses(self, target: Target, exits: torch.Tensor) -> tuple[np.ndarray, float, float]:
        """(M, sample) losses whose mean is the target's risk, with their range [low, high]."""
        if target.kind == "budget":
            share = self.cumulative / self.reference_macs
            return share[exits].numpy(), float(share[0]), float(share[-1])
        if self.correct is None:
            raise ValueError(f"target {target} needs labels")
        right = self.correct.T.gather(0, exits)  # (M, sample)
        if target.kind == "drop":
            return (self.correct[:, -1].unsqueeze(0) - right).numpy(), -1.0, 1.0
        return (1.0 - right).numpy(), 0.0, 1.0

    def risk_target(self, target: Target) -> float:
        """The target as a bound on the mean loss."""
        return 1.0 - target.value if target.kind == "accuracy" else target.value


class _Costs:
    """The two cost facts ScoreSearch reads, for a family whose stage costs are already known."""

    def __init__(self, cumulative: torch.Tensor, reference_macs: float):
        self.cumulative_macs = cumulative.tolist()
        self.reference_macs = reference_macs


def split_path(search: ScoreSearch, target: Target) -> torch.Tensor:
    """Path thresholds (M, K - 1) fitted on the path samples, surely safe rule first.

    Rules fitted at a grid of targets around the requested one with the existing search,
    ordered by their MACs on the path samples (most expensive first; cheapest first for a
    budget), duplicates dropped.
    """
    k1 = len(search.candidates)
    if target.kind == "budget":
        start = [-math.inf] * k1
        macs = target.value * search.reference_macs
        rules = [search.for_budget(g * macs) for g in path_grid(target)]
    else:
        base = search.last_accuracy if target.kind == "drop" else target.value
        start = [math.inf] * k1
        rules = [search.for_accuracy(base - g) for g in path_grid(target)]
    rows = [start] + [_offsets(rule) for rule in rules]
    thresholds = torch.tensor(rows, dtype=torch.float64)
    _, macs = search.evaluate_many(thresholds[1:])
    order = torch.argsort(macs, descending=target.kind != "budget", stable=True)
    path = [thresholds[0]]
    for i in order.tolist():
        if not any(torch.equal(thresholds[1 + i], p) for p in path):
            path.append(thresholds[1 + i])
    return torch.stack(path)


def path_grid(target: Target) -> list[float]:
    """Targets the split path is fitted at: accuracy points below the base, or budget shares."""
    if target.kind == "budget":
        return list(BUDGET_GRID)
    extra = [target.value * s for s in (0.5, 1.0, 1.5, 2.0)] if target.kind == "drop" else []
    return sorted(set(ACCURACY_GRID) | set(extra))


def _offsets(rule: StoppingRule) -> list[float]:
    return list(rule.thresholds if isinstance(rule, ThresholdRule) else rule.offsets)


def fixed_path(family: str | StoppingRule, num_stages: int, target: Target) -> torch.Tensor:
    """One confidence threshold shared by every stage, on a grid fixed before seeing data."""
    if family not in FIXED_FAMILIES:
        raise ValueError(
            f"path='fixed' needs a confidence in [0, 1] (max-softmax, softmax-margin), "
            f"got family={family!r}; use path='split'"
        )
    levels = np.concatenate([[math.inf], FIXED_PATH_LEVELS])
    if target.kind == "budget":
        levels = np.concatenate([[-math.inf], FIXED_PATH_LEVELS[::-1], [math.inf]])
    return torch.tensor(levels, dtype=torch.float64).unsqueeze(1).repeat(1, num_stages - 1)


def path_p_values(
    family: Family, path: torch.Tensor, target: Target, delta: float, bound: str
) -> np.ndarray:
    """P-value of H_j: risk(rule_j) > target for each path rule, on the family's samples.

    The first rule is surely safe where its loss is fixed by construction (the largest
    classifier alone for a drop; the first stage alone for a budget) and gets p = 0 (1 if
    it misses the target, which no rule can then meet).
    """
    losses, low, high = family.losses(target, family.exits(path))
    risk = family.risk_target(target)
    p = p_values(bound, losses, risk, low, high, delta)
    if target.kind != "accuracy":
        p[0] = 0.0 if losses[0].mean() <= risk else 1.0
    return p


def answers_with_last_classifier(family: str | StoppingRule) -> bool:
    """Whether a family's rule that reaches the last stage answers with its arg-max.

    Then the largest classifier alone (:class:`~policycascade.agents.rules.LargestOnlyRule`)
    makes the same answers as the path's surely safe rule (every threshold +inf) and can
    replace it. Not for rules that answer with an ensemble of the visited stages.
    """
    if isinstance(family, str):
        return family != ENSEMBLE
    if isinstance(family, ThresholdRule):
        return family.criterion != ENSEMBLE
    if isinstance(family, ShiftedRule):
        return answers_with_last_classifier(family.base)
    if getattr(family, "predictions", None) is None:
        return True
    return getattr(family, "answer", None) == "exit"


def fixed_sequence(p: np.ndarray, delta: float) -> int:
    """Index of the last path rule rejected before the first p > delta (-1: none)."""
    above = np.flatnonzero(p > delta)
    return (int(above[0]) if len(above) else len(p)) - 1
