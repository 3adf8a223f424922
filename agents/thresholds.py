"""Confidence-threshold stopping rules and three ways to fit their thresholds on validation.

A stage stops when its confidence reaches the stage's threshold. Confidences
(Cavigelli 2024; Berestizshevsky & Even): max-softmax, negative entropy, softmax
margin (top-1 minus top-2 probability) and logit margin (top-1 minus top-2
logit, which equals log p1 - log p2, so the cached softmaxes suffice).
Optional temperature scaling per stage is fitted on validation by NLL.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from policycascade.agents.rules import StoppingRule, first_stop, rule_predictions
from policycascade.agents.stop_features import running_ensemble
from policycascade.costs import StageCosts
from policycascade.rewards import check_alpha, episode_return

CRITERIA = ("max-softmax", "entropy", "softmax-margin", "logit-margin")
# Also available: the running ensemble's max-softmax, answering with the ensemble (the
# information a history-reading learned rule has; measured to lose on digits and synthetic,
# so it is not among the defaults of ``compare``).
ENSEMBLE = "ensemble"
ALL_CRITERIA = (*CRITERIA, ENSEMBLE)
_EPS = 1e-12


def apply_temperature(probs: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Softmax of (logits / T), computed from softmax probabilities (log p = logits + const)."""
    return (probs.clamp_min(_EPS).log() / temperature).softmax(-1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the NLL of ``labels`` (golden-section search on log T)."""
    log_probs = probs.clamp_min(_EPS).log()

    def nll(log_t: float) -> float:
        scaled = (log_probs / torch.exp(torch.tensor(log_t))).log_softmax(-1)
        return float(-scaled.gather(-1, labels.unsqueeze(-1)).mean())

    lo, hi = -3.0, 3.0  # T between 0.05 and 20
    ratio = (5**0.5 - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(torch.exp(torch.tensor((lo + hi) / 2)))


def confidence(probs: torch.Tensor, criterion: str) -> torch.Tensor:
    """Confidence of each softmax over the last axis (higher = surer)."""
    if criterion == "max-softmax":
        return probs.max(-1).values
    if criterion == "entropy":
        return (probs * probs.clamp_min(_EPS).log()).sum(-1)  # minus the entropy
    top2 = probs.topk(2, dim=-1).values
    if criterion == "softmax-margin":
        return top2[..., 0] - top2[..., 1]
    if criterion == "logit-margin":
        return top2[..., 0].clamp_min(_EPS).log() - top2[..., 1].clamp_min(_EPS).log()
    raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")


def minus_per_stage(scores: torch.Tensor, shift: list[float]) -> torch.Tensor:
    """``scores`` (batch, S) float64 minus each visited stage's threshold or offset: >= 0 stops."""
    return scores - torch.tensor(shift[: scores.shape[1]], dtype=torch.float64).to(scores.device)


@dataclass
class ThresholdRule:
    """Stop at stage t when confidence_t >= thresholds[t]; the last stage always stops."""

    criterion: str
    thresholds: list[float]  # K - 1 values; +inf never stops, -inf always stops
    temperatures: list[float] | None = None  # per stage, applied before the confidence
    name: str = field(default="")

    def __post_init__(self):
        if self.criterion not in ALL_CRITERIA:
            raise ValueError(
                f"criterion must be one of {list(ALL_CRITERIA)}, got {self.criterion!r}"
            )
        if not self.name:
            self.name = self.criterion + ("+T" if self.temperatures else "")

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.thresholds) + 1

    def confidences(self, history: torch.Tensor) -> torch.Tensor:
        """Confidence of each visited stage but the last of the cascade, (batch, min(S, K - 1))."""
        stages = min(history.shape[1], len(self.thresholds))
        columns = []
        for t in range(stages):
            probs = history[:, t]
            if self.temperatures is not None:
                probs = apply_temperature(probs, self.temperatures[t])
            if self.criterion == ENSEMBLE:
                columns.append(running_ensemble(history[:, : t + 1])[:, -1].max(-1).values)
            else:
                columns.append(confidence(probs, self.criterion))
        if not columns:
            return history.new_zeros(len(history), 0)
        return torch.stack(columns, dim=1)

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """Confidence minus threshold per stage (float64): >= 0 stops."""
        return minus_per_stage(self.confidences(history).double(), self.thresholds)

    def policy_macs(self) -> list[int]:
        """A threshold on a softmax statistic costs no multiply-accumulates."""
        return [0] * self.num_stages

    def predictions(self, probs: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor | None:
        """The running ensemble's answers for the ensemble criterion, else the exit's arg-max."""
        if self.criterion != ENSEMBLE:
            return None
        answers = running_ensemble(probs).argmax(-1)  # (batch, K)
        return answers.gather(1, exit_stage.to(answers.device).view(-1, 1)).squeeze(1)


@dataclass
class ShiftedRule:
    """Any scored rule with a per-stage offset: stop at stage t where score_t >= offsets[t].

    A learned policy's stop score, thresholded per stage, gives a whole trade-off
    curve from one training, fitted with the same search as the confidence rules.
    """

    base: StoppingRule
    offsets: list[float]  # K - 1 values; 0 everywhere is the base rule itself
    name: str = field(default="")

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return self.base.num_stages

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """The base rule's scores minus the offsets (float64)."""
        return minus_per_stage(self.base.stop_scores(history).double(), self.offsets)

    def policy_macs(self) -> list[int]:
        """The base rule's cost: the offsets add none."""
        return self.base.policy_macs()

    def predictions(self, probs: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor | None:
        """The base rule's answers."""
        return rule_predictions(self.base, probs, exit_stage)


def stage_answers_of(rule: StoppingRule, probs: torch.Tensor) -> torch.Tensor | None:
    """(sample, K) classes a rule answers when it stops at each stage; None: the arg-max."""
    n, k = probs.shape[:2]
    columns = []
    for t in range(k):
        answer = rule_predictions(rule, probs, torch.full((n,), t, dtype=torch.int64))
        if answer is None:
            return None
        columns.append(answer.to(probs.device))
    return torch.stack(columns, dim=1)


def shared_stop_scores(rule: StoppingRule, probs: torch.Tensor, memo: dict) -> torch.Tensor:
    """``rule.stop_scores(probs)``, reading the part a fitted family shares from ``memo``.

    The rules of one search differ only in their per-stage thresholds (or offsets): their
    confidences (or base rule's scores) on the same outputs are computed once per ``memo``
    and the thresholds subtracted by :func:`minus_per_stage`, as the rules' own
    ``stop_scores`` do, so the result is the same tensor. Entries hold what their keys' ids
    name, so no id is reused.
    """
    if not isinstance(memo, dict):
        raise TypeError(f"memo must be a dict (one per set of outputs), got {memo!r}")
    if not isinstance(probs, torch.Tensor) or probs.dim() != 3:
        got = getattr(probs, "shape", type(probs).__name__)
        raise ValueError(f"probs must be a tensor (sample, K, classes), got {got}")
    if type(rule) is ThresholdRule:  # (a subclass may score otherwise)
        temps = None if rule.temperatures is None else tuple(rule.temperatures)
        key = ("confidence", id(probs), rule.criterion, temps, len(rule.thresholds))
        if key not in memo:
            memo[key] = (probs, rule.confidences(probs).double())
        shift = rule.thresholds
    elif type(rule) is ShiftedRule:
        key = ("base", id(probs), id(rule.base))
        if key not in memo:
            memo[key] = ((probs, rule.base), rule.base.stop_scores(probs).double())
        shift = rule.offsets
    else:
        return rule.stop_scores(probs)
    return minus_per_stage(memo[key][1], shift)


class ScoreSearch:
    """Fits per-stage thresholds on a rule's validation stop scores.

    Candidate thresholds per stage are quantiles of that stage's validation scores
    (all distinct values with ``num_candidates=None``) plus +inf; the fitting modes
    search over them by coordinate descent, evaluating every candidate of a stage on
    all samples at once.
    """

    def __init__(
        self,
        scores: torch.Tensor,
        probs: torch.Tensor,
        labels: torch.Tensor,
        costs: StageCosts,
        make_rule: Callable[[list[float]], StoppingRule],
        num_candidates: int | None = 100,
        answers: torch.Tensor | None = None,
    ):
        _check_search_inputs(scores, probs, labels, costs, num_candidates, answers)
        probs, labels = probs.cpu(), labels.cpu()  # a small float64 search: CPU is enough
        self.scores = scores.cpu().double()  # (sample, K - 1)
        self.make_rule = make_rule
        # (sample, K): the class answered on stopping at each stage (default: its arg-max)
        answers = probs.argmax(-1) if answers is None else answers.cpu()
        self.correct = (answers == labels.unsqueeze(1)).to(torch.float64)
        self.cumulative = torch.tensor(costs.cumulative_macs, dtype=torch.float64)
        self.reference_macs = float(costs.reference_macs)
        self._numpy: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # integer MACs whose sums stay exact in float64 allow the sorted per-stage evaluation
        self._integral_macs = bool(
            (self.cumulative == self.cumulative.round()).all()
            and float(self.cumulative.abs().max()) * max(len(labels), 1) < 2.0**52
        )
        quantiles = None
        if num_candidates is not None:
            quantiles = torch.linspace(0, 1, num_candidates, dtype=torch.float64)
        self.candidates = [
            torch.cat(
                [
                    (
                        self.scores[:, t].unique()
                        if quantiles is None
                        else torch.quantile(self.scores[:, t], quantiles).unique()
                    ),
                    torch.tensor([float("inf")], dtype=torch.float64),
                ]
            )
            for t in range(self.scores.shape[1])
        ]

    @classmethod
    def for_rule(
        cls,
        rule: StoppingRule,
        probs: torch.Tensor,
        labels: torch.Tensor,
        costs: StageCosts,
        num_candidates: int | None = 100,
    ) -> ScoreSearch:
        """The search over offsets of any rule's stop scores (its own MACs and answers)."""
        return cls(
            rule.stop_scores(probs),
            probs,
            labels,
            costs.with_policy_macs(rule.policy_macs()),
            lambda offsets: ShiftedRule(rule, offsets),
            num_candidates,
            stage_answers_of(rule, probs),
        )

    def evaluate_many(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation accuracy and mean MACs of M threshold vectors (M, K - 1) at once."""
        m = thresholds.shape[0]
        full = torch.cat([thresholds, torch.full((m, 1), float("-inf"))], dim=1)
        scores = torch.cat([self.scores, self.scores.new_zeros(len(self.scores), 1)], dim=1)
        stop = scores.unsqueeze(1) >= full.unsqueeze(0)  # (N, M, K)
        exit_stage = first_stop(stop.reshape(-1, stop.shape[-1])).view(-1, m)  # (N, M)
        correct = self.correct.gather(1, exit_stage)  # (N, M)
        return correct.mean(0), self.cumulative[exit_stage].mean(0)

    def evaluate_stage(
        self, current: torch.Tensor, t: int, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`evaluate_many` of ``current`` with stage ``t``'s threshold set to each candidate.

        Only the samples that reach stage ``t`` depend on its threshold: each stops there
        when its score is at least the candidate and otherwise exits where the later
        thresholds send it. Sorting their scores once turns every candidate's totals into
        a suffix sum, O(N log N + M) instead of O(N M K). Sums of 0/1 correctness and of
        integer MACs are exact in float64, so the results equal :meth:`evaluate_many`'s.
        Runs in NumPy: the arrays are small, and torch's per-call overhead dominated.
        """
        scores, correct, cumulative = self._arrays()
        n = len(correct)
        stop = scores >= current.numpy()  # (N, K - 1) under the current thresholds
        stop[:, t] = False
        # the first stop, else the last stage
        exits = np.where(stop.any(1), stop.argmax(1), stop.shape[1])
        reaches = exits > t  # no earlier stop (stage t itself never stops here)
        correct_else = correct[np.arange(n), exits]
        macs_else = cumulative[exits]
        base_correct, base_macs = correct_else.sum(), macs_else.sum()
        s = scores[reaches, t]
        order = np.argsort(s, kind="stable")
        # gains of stopping at stage t, over the samples that reach it, sorted by score
        gain_correct = (correct[reaches, t] - correct_else[reaches])[order]
        gain_macs = (cumulative[t] - macs_else[reaches])[order]
        suffix = np.zeros((2, len(s) + 1))
        suffix[0, :-1] = np.cumsum(gain_correct[::-1])[::-1]
        suffix[1, :-1] = np.cumsum(gain_macs[::-1])[::-1]
        first = np.searchsorted(s[order], candidates.numpy(), side="left")  # first >= candidate
        return (
            torch.from_numpy((base_correct + suffix[0, first]) / n),
            torch.from_numpy((base_macs + suffix[1, first]) / n),
        )

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """NumPy views of the scores, correctness and cumulative MACs (made once)."""
        if self._numpy is None:
            self._numpy = (self.scores.numpy(), self.correct.numpy(), self.cumulative.numpy())
        return self._numpy

    def _coordinate_search(self, start: list[float], score, passes: int = 3) -> StoppingRule:
        """Improve one stage's threshold at a time.

        ``score(acc, macs)`` maps tensors of candidate results to a tuple of
        tensors compared lexicographically (larger is better); every candidate of
        a stage is evaluated in one batched call.
        """
        current = torch.tensor(start, dtype=torch.float64)
        best = tuple(float(v) for v in score(*self.evaluate_many(current.unsqueeze(0))))
        for _ in range(passes):
            changed = False
            for t in range(len(current)):
                candidates = self.candidates[t]
                if self._integral_macs:
                    keys = score(*self.evaluate_stage(current, t, candidates))
                else:  # fractional MACs: sum in evaluate_many's order
                    trials = current.repeat(len(candidates), 1)
                    trials[:, t] = candidates
                    keys = score(*self.evaluate_many(trials))
                top = lexicographic_argmax(keys)
                value = tuple(float(k[top]) for k in keys)
                if value > best:
                    best, changed = value, True
                    current = current.clone()
                    current[t] = candidates[top]
            if not changed:
                break
        return self.make_rule(current.tolist())

    @property
    def last_accuracy(self) -> float:
        """Validation accuracy of the last classifier alone."""
        return float(self.correct[:, -1].mean())

    def for_accuracy(self, target: float) -> StoppingRule:
        """Cheapest thresholds whose validation accuracy is at least ``target``.

        Where no thresholds reach the target, the most accurate ones found are returned.
        """

        def score(acc, macs):
            feasible = acc >= target - 1e-12
            # feasible: cheaper is better; not (yet) feasible: closer to the target is better
            return (feasible.double(), torch.where(feasible, -macs, acc), acc)

        return self._coordinate_search([float("inf")] * len(self.candidates), score)

    def for_accuracy_drop(self, epsilon: float) -> StoppingRule:
        """Cheapest thresholds within ``epsilon`` accuracy (0.005 = half a point) of the last."""
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        return self.for_accuracy(self.last_accuracy - epsilon)

    def for_budget(self, macs_budget: float) -> StoppingRule:
        """Most accurate thresholds whose mean validation MACs per sample stay within the budget.

        Where no thresholds fit the budget, the cheapest ones found are returned.
        """
        if not macs_budget > 0:
            raise ValueError(f"macs_budget must be > 0, got {macs_budget}")

        def score(acc, macs):
            feasible = macs <= macs_budget + 1e-9
            return (feasible.double(), torch.where(feasible, acc, -macs), -macs)

        return self._coordinate_search([float("-inf")] * len(self.candidates), score)

    def for_reward(self, alpha: float) -> StoppingRule:
        """Thresholds with the best mean validation reward ``accuracy - alpha * MACs / reference``.

        The objective a stopping policy trained at cost weight ``alpha`` maximises (0/1
        loss, costs normalised to the most expensive classifier).
        """
        alpha = check_alpha(alpha)

        def score(acc, macs):
            return (episode_return(alpha, macs / self.reference_macs, 1.0 - acc), -macs)

        return self._coordinate_search([float("inf")] * len(self.candidates), score)

    def sweep(self, points: int = 15) -> list[StoppingRule]:
        """Rules along the trade-off curve: the most accurate within each of ``points`` budgets.

        Budgets are log-spaced from the first stage's cost to the cost of running every
        stage, so the curve spans every reachable operating point.
        """
        low, high = float(self.cumulative[0]), float(self.cumulative[-1])
        budgets = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
        return [self.for_budget(float(b)) for b in budgets]


def _check_search_inputs(
    scores: object,
    probs: object,
    labels: object,
    costs: object,
    num_candidates: object,
    answers: object,
) -> None:
    """A clear ValueError/TypeError for inputs :class:`ScoreSearch` cannot fit on.

    NaN scores are refused: a NaN never stops, and no threshold could be fitted to it.
    """
    for name, value in (("scores", scores), ("probs", probs), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if not (hasattr(costs, "cumulative_macs") and hasattr(costs, "reference_macs")):
        raise TypeError(f"costs must be StageCosts, got {type(costs).__name__}")
    if probs.dim() != 3:
        raise ValueError(f"probs must be (sample, K, classes), got shape {tuple(probs.shape)}")
    n, k = probs.shape[:2]
    if n == 0:
        raise ValueError("the validation outputs hold no samples: a search needs at least one")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},) as probs, got {tuple(labels.shape)}")
    if len(costs.cumulative_macs) != k:
        raise ValueError(f"costs cover {len(costs.cumulative_macs)} stages, probs {k}")
    if tuple(scores.shape) != (n, k - 1):
        raise ValueError(f"scores must have shape {(n, k - 1)}, got {tuple(scores.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[2]):
        raise ValueError(
            f"labels must be class indices in [0, {probs.shape[2]}), got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    if scores.is_complex():
        raise ValueError(f"scores must be real numbers, got {scores.dtype}")
    if torch.isnan(scores).any():
        sample, stage = torch.isnan(scores).nonzero()[0].tolist()
        raise ValueError(
            f"stop scores are NaN at sample {sample}, stage {stage}: no threshold can be fitted "
            "to them (are the probs finite softmaxes?)"
        )
    if answers is not None and (
        not isinstance(answers, torch.Tensor) or tuple(answers.shape) != (n, k)
    ):
        got = tuple(answers.shape) if isinstance(answers, torch.Tensor) else type(answers).__name__
        raise ValueError(f"answers must be a tensor of shape {(n, k)}, got {got}")
    if num_candidates is not None and (
        isinstance(num_candidates, bool)
        or not isinstance(num_candidates, numbers.Integral)
        or num_candidates < 1
    ):
        raise ValueError(f"num_candidates must be None or an integer >= 1, got {num_candidates!r}")


def lexicographic_argmax(keys: tuple[torch.Tensor, ...]) -> int:
    """Index of the largest candidate, comparing the keys' values in order; the last of ties.

    The same choice as ``sorted(range(m), key=lambda i: tuple(k[i] for k in keys))[-1]``
    (a stable sort puts the last of equal candidates last), without a Python loop.
    """
    best = np.ones(len(keys[0]), dtype=bool)
    for key in keys:
        values = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key, np.float64)
        top = np.where(best, values, -np.inf).max()
        best &= values == top
    return int(np.flatnonzero(best)[-1])


class ThresholdSearch(ScoreSearch):
    """The search over one confidence criterion's thresholds (temperature-scaled if asked)."""

    def __init__(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        costs: StageCosts,
        criterion: str = "max-softmax",
        temperature_scaling: bool = False,
        num_candidates: int | None = 100,
    ):
        probs, labels = probs.cpu(), labels.cpu()
        k = probs.shape[1]
        temps = None
        if temperature_scaling:
            temps = [fit_temperature(probs[:, t], labels) for t in range(k)]
        self.template = ThresholdRule(criterion, [float("inf")] * (k - 1), temps)
        t = self.template

        def make_rule(thresholds: list[float]) -> ThresholdRule:
            return ThresholdRule(
                t.criterion, [float(x) for x in thresholds], t.temperatures, t.name
            )

        super().__init__(
            t.confidences(probs),
            probs,
            labels,
            costs.with_policy_macs([0] * k),
            make_rule,
            num_candidates,
            stage_answers_of(t, probs),
        )


def best_reward_rule(
    probs: torch.Tensor,
    labels: torch.Tensor,
    costs: StageCosts,
    alpha: float,
    criteria: tuple[str, ...] = CRITERIA,
) -> ThresholdRule:
    """Of every criterion's best-reward thresholds on these (validation) outputs, the best.

    What a user would otherwise deploy at cost weight ``alpha``: the threshold rule with
    the highest validation reward ``accuracy - alpha * MACs / reference``.
    """
    best, best_reward = None, float("-inf")
    for criterion in criteria:
        search = ThresholdSearch(probs, labels, costs, criterion)
        rule = search.for_reward(alpha)
        accuracy, macs = search.evaluate_many(torch.tensor([rule.thresholds], dtype=torch.float64))
        reward = float(episode_return(alpha, macs[0] / search.reference_macs, 1.0 - accuracy[0]))
        if reward > best_reward:
            best, best_reward = rule, reward
    return best


def oracle_exits(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exit at the first right stage (else the last): no policy beats it on these outputs."""
    return first_stop(probs.argmax(-1) == labels.unsqueeze(1))


def random_exits(
    num_samples: int, exit_distribution: list[float], generator: torch.Generator
) -> torch.Tensor:
    """Exit stages drawn independently of the input from a given distribution (matched cost)."""
    weights = torch.tensor(exit_distribution, dtype=torch.float64)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)
