"""Class-aware thresholds: one confidence threshold per stage *and predicted class*.

A stage that is confidently wrong on some classes (a specialist, a class with noisy
labels) gives a shared threshold one bad choice: trust it everywhere or nowhere. Here
stage t stops when ``confidence_t >= thresholds[t][c]``, c the stage's arg-max, so the
rule can stop early on the classes the stage gets right and never on the others.

Fitting (on validation outputs) shrinks each class toward the shared threshold with a
pseudo-count prior: class c's threshold at stage t maximises

    sum over its samples of reward(theta) + m * mean over all samples of reward(theta),

its own ``n_c`` samples plus ``m`` pseudo-samples drawn from the stage's pooled population,
whose optimum is the shared threshold. A class with ``n_c << m`` samples stays at the
shared threshold; one with ``n_c >> m`` gets its own. Accuracy and budget targets are met
through the Lagrangian: reward fits over a grid of cost weights ``alpha`` (plus the shared
rule itself) are filtered by the target, then one offset per stage is searched on top.

By default m is chosen by k-fold cross-validation on the fitting outputs themselves
(:func:`cross_validate_prior`): each m of a small grid is fitted on k - 1 folds at cost
weights spread over the grid and scored by the reward it earns on the held-out fold; an
explicit m skips it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from policycascade.agents.rules import first_stop
from policycascade.agents.thresholds import (
    CRITERIA,
    ScoreSearch,
    ThresholdRule,
    ThresholdSearch,
    apply_temperature,
    confidence,
    minus_per_stage,
)
from policycascade.costs import StageCosts
from policycascade.rewards import check_alpha

DEFAULT_PRIOR_SAMPLES = 50.0  # m when it cannot be cross-validated (fewer samples than 2k)
PRIOR_GRID = (0.0, 10.0, 50.0, 200.0, 1000.0)  # the m cross-validation chooses from
CV_FOLDS = 5  # k of the k-fold cross-validation of m
CV_SEED = 0  # fixes the folds, so a fit is reproducible
CV_ALPHAS = 9  # cost weights the cross-validation scores m at: evenly spread over ``alphas``
# cost weights of the reward fits that the accuracy and budget targets choose from
DEFAULT_ALPHAS = tuple(float(a) for a in torch.logspace(-4, 0, 33, dtype=torch.float64))


@dataclass
class ClassAwareThresholdRule:
    """Stop at stage t when confidence_t >= thresholds[t][arg-max of stage t]; the last stops."""

    criterion: str
    thresholds: list[list[float]]  # (K - 1) x C; +inf never stops, -inf always stops
    temperatures: list[float] | None = None  # per stage, applied before the confidence
    name: str = field(default="")
    shared_thresholds: list[float] | None = None  # fitted: the shared rule it was shrunk toward
    alpha: float | None = None  # fitted: cost weight of the reward fit it came from
    offsets: list[float] | None = None  # fitted: K - 1 per-stage shifts on top of thresholds

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        rows = self.thresholds
        if not (
            isinstance(rows, list | tuple)
            and rows
            and all(isinstance(r, list | tuple) for r in rows)
        ):
            raise ValueError(
                f"thresholds must be a non-empty list of per-class lists (K - 1 stages), "
                f"got {rows!r}"
            )
        widths = {len(r) for r in rows}
        if len(widths) != 1 or min(widths) < 1:
            raise ValueError(
                f"thresholds must hold one value per class at every stage, got lengths "
                f"{[len(r) for r in rows]}"
            )
        if any(math.isnan(float(v)) for r in rows for v in r):
            raise ValueError(f"thresholds must not be NaN, got {rows!r}")
        self.thresholds = [[float(v) for v in r] for r in rows]
        if self.temperatures is not None and (
            len(self.temperatures) != self.num_stages
            or not all(float(v) > 0 for v in self.temperatures)
        ):
            raise ValueError(
                f"temperatures must be {self.num_stages} positive values, got {self.temperatures!r}"
            )
        if not self.name:
            self.name = "class-aware " + self.criterion + ("+T" if self.temperatures else "")

    @classmethod
    def from_shared(cls, rule: ThresholdRule, num_classes: int) -> ClassAwareThresholdRule:
        """The class-aware rule that decides exactly as ``rule`` (every class at its threshold)."""
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        return cls(
            rule.criterion,
            [[float(v)] * num_classes for v in rule.thresholds],
            rule.temperatures,
            shared_thresholds=list(rule.thresholds),
        )

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.thresholds) + 1

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.thresholds[0])

    def confidences(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Confidence and predicted class of each visited stage but the last, (batch, S') each."""
        if history.dim() != 3 or history.shape[2] != self.num_classes:
            raise ValueError(
                f"history must be (batch, stages, {self.num_classes}) softmaxes, "
                f"got shape {tuple(history.shape)}"
            )
        stages = min(history.shape[1], len(self.thresholds))
        probs = history[:, :stages]
        if self.temperatures is not None:
            temps = torch.tensor(self.temperatures[:stages], dtype=probs.dtype)
            probs = apply_temperature(probs, temps.to(probs.device).view(1, -1, 1))
        return confidence(probs, self.criterion), history[:, :stages].argmax(-1)

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """Confidence minus the predicted class's threshold per stage (float64): >= 0 stops."""
        conf, predicted = self.confidences(history)
        table = torch.tensor(self.thresholds, dtype=torch.float64, device=conf.device)
        stages = torch.arange(conf.shape[1], device=conf.device).expand_as(predicted)
        scores = conf.double() - table[stages, predicted]
        if self.offsets is None:
            return scores
        # subtracted separately, as ScoreSearch compares scores with offsets: exact agreement
        # (inf - inf stops there, so it is 0 here)
        shifted = minus_per_stage(scores, self.offsets)
        return torch.where(shifted.isnan(), 0.0, shifted)

    def policy_macs(self) -> list[int]:
        """A threshold on a softmax statistic costs no multiply-accumulates."""
        return [0] * self.num_stages

    def with_offsets(self, offsets: list[float]) -> ClassAwareThresholdRule:
        """The rule with ``offsets[t]`` added to every class's threshold at stage t."""
        if self.offsets is not None:
            raise ValueError(f"the rule already has offsets {self.offsets}")
        return dataclasses.replace(self, offsets=[float(d) for d in offsets])


def _check_search_args(
    probs: torch.Tensor,
    labels: torch.Tensor,
    costs: StageCosts,
    prior_samples: float | str,
    prior_grid: tuple[float, ...],
    folds: int,
    alphas: tuple[float, ...],
    passes: int,
) -> None:
    """Raise ValueError, naming the argument, where :class:`ClassAwareSearch` cannot take it."""
    if not (isinstance(probs, torch.Tensor) and probs.dim() == 3 and probs.shape[1] >= 2):
        raise ValueError(
            f"probs must be a (sample, K >= 2, class) tensor, got {getattr(probs, 'shape', probs)}"
        )
    if not (isinstance(labels, torch.Tensor) and labels.shape == probs.shape[:1]):
        raise ValueError(
            f"labels must be a ({probs.shape[0]},) tensor, got {getattr(labels, 'shape', labels)}"
        )
    if costs.num_stages != probs.shape[1]:
        raise ValueError(f"costs has {costs.num_stages} stages but probs has {probs.shape[1]}")
    if prior_samples != "cv" and not (
        isinstance(prior_samples, int | float)
        and not isinstance(prior_samples, bool)
        and prior_samples >= 0
    ):
        raise ValueError(f"prior_samples must be 'cv' or a number >= 0, got {prior_samples!r}")
    if not prior_grid or any(
        isinstance(m, bool) or not isinstance(m, int | float) or not m >= 0 for m in prior_grid
    ):
        raise ValueError(f"prior_grid must be numbers >= 0, got {prior_grid!r}")
    if isinstance(folds, bool) or not (isinstance(folds, int) and folds >= 2):
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if not alphas or any(not (math.isfinite(a) and a >= 0) for a in alphas):
        raise ValueError(f"alphas must be finite values >= 0, got {alphas!r}")
    if not (isinstance(passes, int) and passes >= 1):
        raise ValueError(f"passes must be an integer >= 1, got {passes!r}")


class ClassAwareSearch:
    """Fits class-aware thresholds on validation outputs, one entry per target.

    Same signature and fitting entries as :class:`ThresholdSearch` (``for_reward``,
    ``for_accuracy``, ``for_accuracy_drop``, ``for_budget``, ``sweep``), so ``compare``
    can treat it as another family. ``prior_samples`` is the pseudo-count m of the
    shrinkage (0: every class fitted alone; inf: the shared rule; ``"cv"``, the default:
    the m of ``prior_grid`` with the best held-out reward in ``folds``-fold cross-validation
    on these outputs, read back as ``prior_samples`` with every m's score in
    ``prior_scores``); ``alphas`` the cost weights of the reward fits the targets choose from.
    """

    def __init__(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        costs: StageCosts,
        criterion: str = "max-softmax",
        temperature_scaling: bool = False,
        num_candidates: int | None = 100,
        prior_samples: float | str = "cv",
        alphas: tuple[float, ...] = DEFAULT_ALPHAS,
        passes: int = 3,
        prior_grid: tuple[float, ...] = PRIOR_GRID,
        folds: int = CV_FOLDS,
    ):
        _check_search_args(probs, labels, costs, prior_samples, prior_grid, folds, alphas, passes)
        self.shared = ThresholdSearch(
            probs, labels, costs, criterion, temperature_scaling, num_candidates
        )
        self._prior = None if prior_samples == "cv" else float(prior_samples)
        self.prior_grid = tuple(float(m) for m in prior_grid)
        self.folds = folds
        self.prior_scores: dict[float, float] | None = None  # held-out reward per m (cv only)
        self.temperature_scaling = temperature_scaling
        self.criterion = criterion
        self.alphas = tuple(float(a) for a in alphas)
        self.passes = passes
        self.num_classes = probs.shape[2]
        self.probs, self.labels = probs.cpu(), labels.cpu()
        self.costs = costs.with_policy_macs([0] * probs.shape[1])
        self.num_candidates = num_candidates
        template = self.shared.template
        self.template = ClassAwareThresholdRule.from_shared(template, self.num_classes)
        self.name = self.template.name
        self.conf, self.predicted = self.template.confidences(self.probs)  # (N, K - 1) each
        self.conf = self.conf.double()
        self._always = torch.ones(len(self.probs), 1, dtype=torch.bool)  # the last stage stops
        self._grid: list[ClassAwareThresholdRule] | None = None

    @property
    def prior_samples(self) -> float:
        """The shrinkage pseudo-count m: as given, or chosen by cross-validation on first use."""
        if self._prior is None:
            if len(self.labels) < 2 * self.folds:
                self._prior = DEFAULT_PRIOR_SAMPLES
            else:
                self.prior_scores = cross_validate_prior(self)
                best = max(self.prior_scores.values())
                # ties: the largest m (the fewest effective parameters)
                self._prior = max(m for m, v in self.prior_scores.items() if v >= best - 1e-12)
        return self._prior

    @property
    def reference_macs(self) -> float:
        """MACs of the most expensive classifier (the unit of cost)."""
        return self.shared.reference_macs

    @property
    def last_accuracy(self) -> float:
        """Validation accuracy of the last classifier alone."""
        return self.shared.last_accuracy

    def evaluate(self, rule: ClassAwareThresholdRule) -> tuple[float, float]:
        """Validation accuracy and mean MACs of one rule."""
        exits = first_stop(torch.cat([rule.stop_scores(self.probs) >= 0, self._always], dim=1))
        return float(self.shared.correct.gather(1, exits[:, None]).mean()), float(
            self.shared.cumulative[exits].mean()
        )

    def _exits(self, table: torch.Tensor) -> torch.Tensor:
        """Exit stage of every validation sample under a (K - 1, C) threshold table."""
        stages = torch.arange(table.shape[0]).expand_as(self.predicted)
        stop = self.conf >= table[stages, self.predicted]
        return first_stop(torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1))

    def _rewards(self, alpha: float) -> torch.Tensor:
        """(sample, K) reward of exiting at each stage: correct - alpha * MACs / reference."""
        share = self.shared.cumulative / self.reference_macs
        return self.shared.correct - alpha * share.unsqueeze(0)

    def _refit_classes(
        self, start: ThresholdRule, alpha: float, prior_samples: float | None = None
    ) -> ClassAwareThresholdRule:
        """Coordinate ascent over stages, all classes of a stage at once, from the shared rule."""
        table = torch.tensor(
            [[v] * self.num_classes for v in start.thresholds], dtype=torch.float64
        )
        m = self.prior_samples if prior_samples is None else prior_samples
        rewards = self._rewards(alpha)
        n = len(rewards)
        rows = torch.arange(n)
        for _ in range(self.passes):
            changed = False
            for t in range(table.shape[0]):
                never = table.clone()
                never[t] = float("inf")
                exits = self._exits(never)  # where each sample ends if stage t never stops
                reach = exits >= t
                if not bool(reach.any()):
                    continue
                gain = rewards[:, t] - rewards[rows, exits]  # of stopping at t instead
                candidates = self.shared.candidates[t]  # ascending, +inf last
                per_class, pooled = _gains_above(
                    self.conf[reach, t],
                    gain[reach],
                    self.predicted[reach, t],
                    candidates,
                    self.num_classes,
                )
                objective = pooled if math.isinf(m) else per_class + m * pooled
                best = objective.max(1, keepdim=True).values
                # ties: the lowest threshold (fewest MACs), as the shared fit breaks them
                choice = (objective >= best - 1e-12).to(torch.uint8).argmax(1)
                new = candidates[choice]
                if not torch.equal(new, table[t]):
                    table[t], changed = new, True
            if not changed:
                break
        return ClassAwareThresholdRule(
            start.criterion,
            table.tolist(),
            start.temperatures,
            self.name,
            shared_thresholds=list(start.thresholds),
            alpha=alpha,
        )

    def for_reward(self, alpha: float) -> ClassAwareThresholdRule:
        """Shrunk class thresholds with the best validation reward at cost weight ``alpha``.

        Starts from the shared rule's best-reward thresholds at the same ``alpha``.
        """
        alpha = check_alpha(alpha)
        return self._refit_classes(self.shared.for_reward(alpha), alpha)

    @property
    def grid(self) -> list[ClassAwareThresholdRule]:
        """The reward fits at every cost weight of ``alphas`` (computed once)."""
        if self._grid is None:
            self._grid = [self.for_reward(a) for a in self.alphas]
        return self._grid

    def _polished(self, start: ClassAwareThresholdRule, score) -> ClassAwareThresholdRule:
        """One offset per stage on top of ``start``, searched for ``score`` from offsets 0."""
        search = ScoreSearch(
            start.stop_scores(self.probs),
            self.probs,
            self.labels,
            self.costs,
            start.with_offsets,
            self.num_candidates,
        )
        zero = torch.zeros(1, dtype=torch.float64)
        search.candidates = [torch.cat([c, zero]).unique() for c in search.candidates]
        return search._coordinate_search([0.0] * (start.num_stages - 1), score)

    def for_accuracy(self, target: float) -> ClassAwareThresholdRule:
        """Cheapest fitted rule whose validation accuracy is at least ``target``.

        Of the reward fits and the shared rule's fit for ``target``, the cheapest that
        reaches it (else the most accurate), then per-stage offsets searched on top.
        """
        if not (isinstance(target, int | float) and math.isfinite(target)):
            raise ValueError(f"target must be a finite accuracy, got {target!r}")

        def score(acc, macs):
            feasible = acc >= target - 1e-12
            return (feasible.double(), torch.where(feasible, -macs, acc), acc)

        shared = ClassAwareThresholdRule.from_shared(
            self.shared.for_accuracy(target), self.num_classes
        )
        return self._polished(self._best([*self.grid, shared], score), score)

    def for_accuracy_drop(self, epsilon: float) -> ClassAwareThresholdRule:
        """Cheapest rule within ``epsilon`` accuracy (0.005 = half a point) of the last stage."""
        if not (isinstance(epsilon, int | float) and epsilon >= 0):
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        return self.for_accuracy(self.last_accuracy - epsilon)

    def for_budget(self, macs_budget: float) -> ClassAwareThresholdRule:
        """Most accurate fitted rule whose mean validation MACs stay within ``macs_budget``."""
        if not (isinstance(macs_budget, int | float) and macs_budget > 0):
            raise ValueError(f"macs_budget must be > 0, got {macs_budget!r}")

        def score(acc, macs):
            feasible = macs <= macs_budget + 1e-9
            return (feasible.double(), torch.where(feasible, acc, -macs), -macs)

        shared = ClassAwareThresholdRule.from_shared(
            self.shared.for_budget(macs_budget), self.num_classes
        )
        return self._polished(self._best([*self.grid, shared], score), score)

    def sweep(self, points: int = 15) -> list[ClassAwareThresholdRule]:
        """Rules along the trade-off curve: the most accurate within log-spaced MAC budgets."""
        if isinstance(points, bool) or not (isinstance(points, int) and points >= 2):
            raise ValueError(f"points must be an integer >= 2, got {points!r}")
        low, high = float(self.shared.cumulative[0]), float(self.shared.cumulative[-1])
        budgets = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
        return [self.for_budget(float(b)) for b in budgets]

    def _best(self, rules: list[ClassAwareThresholdRule], score) -> ClassAwareThresholdRule:
        """The rule whose (accuracy, MACs) scores highest, lexicographically."""
        results = [self.evaluate(r) for r in rules]
        acc = torch.tensor([a for a, _ in results], dtype=torch.float64)
        macs = torch.tensor([m for _, m in results], dtype=torch.float64)
        keys = score(acc, macs)
        top = max(range(len(rules)), key=lambda i: tuple(float(k[i]) for k in keys))
        return rules[top]


def _gains_above(
    conf: torch.Tensor,
    gain: torch.Tensor,
    predicted: torch.Tensor,
    candidates: torch.Tensor,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class and candidate theta, the summed ``gain`` of samples with ``conf >= theta``.

    Returns ``(per_class (C, M), pooled (C, M))``, pooled the mean over all samples (the
    prior), from suffix sums over the samples sorted by confidence: O(n C + M C), not O(n M).
    """
    order = conf.argsort()
    sorted_conf = conf[order]
    per_sample = torch.zeros(len(conf) + 1, num_classes, dtype=torch.float64)
    per_sample[torch.arange(len(conf)), predicted[order]] = gain[order]
    suffix = per_sample.flip(0).cumsum(0).flip(0)  # row i: samples i.. of the sorted order
    first = torch.searchsorted(sorted_conf, candidates, right=False)  # first conf >= theta
    per_class = suffix[first].T.contiguous()
    pooled = (per_class.sum(0) / len(conf)).expand_as(per_class)
    return per_class, pooled


def cross_validate_prior(search: ClassAwareSearch) -> dict[float, float]:
    """Held-out reward of each m of ``search.prior_grid``, summed over its cost weights and folds.

    The fitting outputs are split into ``search.folds`` random folds (fixed by ``CV_SEED``).
    On each, every m is fitted on the other folds at up to ``CV_ALPHAS`` cost weights spread
    evenly over ``search.alphas`` (the fits the targets choose from; both ends included),
    starting from the shared rule fitted there, and scored by its reward
    ``correct - alpha * MACs / largest MACs`` on the held-out fold.
    """
    n = len(search.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CV_SEED))
    scores = dict.fromkeys(search.prior_grid, 0.0)
    spread = torch.linspace(0, len(search.alphas) - 1, min(len(search.alphas), CV_ALPHAS))
    alphas = [search.alphas[int(i)] for i in spread.round().unique()]
    for k in range(search.folds):
        held = order[k :: search.folds]
        kept = torch.ones(n, dtype=torch.bool)
        kept[held] = False
        inner = ClassAwareSearch(
            search.probs[kept],
            search.labels[kept],
            search.costs,
            search.criterion,
            search.temperature_scaling,
            search.num_candidates,
            prior_samples=0.0,
            passes=search.passes,
        )
        correct = (search.probs[held].argmax(-1) == search.labels[held].unsqueeze(1)).double()
        share = search.shared.cumulative / search.reference_macs
        for alpha in alphas:
            start = inner.shared.for_reward(alpha)
            for m in search.prior_grid:
                rule = inner._refit_classes(start, alpha, m)
                stop = rule.stop_scores(search.probs[held]) >= 0
                exits = first_stop(torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1))
                reward = correct.gather(1, exits[:, None]).squeeze(1) - alpha * share[exits]
                scores[m] += float(reward.sum())
    return {m: v / n for m, v in scores.items()}
