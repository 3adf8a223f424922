"""Confidence-threshold stopping rules and three ways to fit their thresholds on validation.

A stage stops when its confidence reaches the stage's threshold. Confidences
(Cavigelli 2024; Berestizshevsky & Even): max-softmax, negative entropy, softmax
margin (top-1 minus top-2 probability) and logit margin (top-1 minus top-2
logit, which equals log p1 - log p2, so the cached softmaxes suffice).
Optional temperature scaling per stage is fitted on validation by NLL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policycascade.costs import StageCosts
from policycascade.evaluation import first_stop
from policycascade.rewards import check_alpha

CRITERIA = ("max-softmax", "entropy", "softmax-margin", "logit-margin")
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


@dataclass
class ThresholdRule:
    """Stop at stage t when confidence_t >= thresholds[t]; the last stage always stops."""

    criterion: str
    thresholds: list[float]  # K - 1 values; +inf never stops, -inf always stops
    temperatures: list[float] | None = None  # per stage, applied before the confidence
    name: str = field(default="")

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if not self.name:
            self.name = self.criterion + ("+T" if self.temperatures else "")

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.thresholds) + 1

    def stage_confidence(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Confidence of stage ``stage``'s softmax (batch, C), temperature-scaled if fitted."""
        if self.temperatures is not None:
            probs = apply_temperature(probs, self.temperatures[stage])
        return confidence(probs, self.criterion)

    def stop_at_stage(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Stop decisions (batch,) at ``stage``."""
        if stage >= len(self.thresholds):
            return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        return self.stage_confidence(stage, probs) >= self.thresholds[stage]

    def policy_macs(self) -> list[int]:
        """A threshold on a softmax statistic costs no multiply-accumulates."""
        return [0] * self.num_stages


class ThresholdSearch:
    """Fits thresholds of one criterion on validation outputs.

    Candidate thresholds per stage are quantiles of that stage's validation
    confidences (plus +inf); the three fitting modes search over them by
    coordinate descent, evaluating every candidate on all samples at once.
    """

    def __init__(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        costs: StageCosts,
        criterion: str = "max-softmax",
        temperature_scaling: bool = False,
        num_candidates: int = 100,
    ):
        probs, labels = probs.cpu(), labels.cpu()  # a small float64 search: CPU is enough
        k = probs.shape[1]
        temps = None
        if temperature_scaling:
            temps = [fit_temperature(probs[:, t], labels) for t in range(k)]
        self.template = ThresholdRule(criterion, [float("inf")] * (k - 1), temps)
        self.conf = torch.stack(
            [self.template.stage_confidence(t, probs[:, t]) for t in range(k)], dim=1
        )  # (sample, stage)
        self.correct = (probs.argmax(-1) == labels.unsqueeze(1)).to(torch.float64)
        self.cumulative = torch.tensor(costs.cumulative_macs, dtype=torch.float64)
        self.reference_macs = float(costs.reference_macs)
        quantiles = torch.linspace(0, 1, num_candidates, dtype=torch.float64)
        self.candidates = [
            torch.cat(
                [
                    torch.quantile(self.conf[:, t].double(), quantiles).unique(),
                    torch.tensor([float("inf")], dtype=torch.float64),
                ]
            )
            for t in range(k - 1)
        ]

    def rule(self, thresholds: list[float]) -> ThresholdRule:
        """A rule with the search's criterion and temperatures and these thresholds."""
        t = self.template
        return ThresholdRule(t.criterion, [float(x) for x in thresholds], t.temperatures, t.name)

    def evaluate_many(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation accuracy and mean MACs of M threshold vectors (M, K - 1) at once."""
        m = thresholds.shape[0]
        full = torch.cat([thresholds, torch.full((m, 1), float("-inf"))], dim=1)
        stop = self.conf.unsqueeze(1) >= full.unsqueeze(0).to(self.conf.dtype)  # (N, M, K)
        exit_stage = first_stop(stop.reshape(-1, stop.shape[-1])).view(-1, m)  # (N, M)
        correct = self.correct.gather(1, exit_stage)  # (N, M)
        return correct.mean(0), self.cumulative[exit_stage].mean(0)

    def evaluate(self, thresholds: list[float]) -> tuple[float, float]:
        """Validation (accuracy, mean MACs) of one threshold vector."""
        acc, macs = self.evaluate_many(torch.tensor([thresholds], dtype=torch.float64))
        return float(acc[0]), float(macs[0])

    def _coordinate_search(self, start: list[float], score, passes: int = 3) -> list[float]:
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
                trials = current.repeat(len(self.candidates[t]), 1)
                trials[:, t] = self.candidates[t]
                keys = score(*self.evaluate_many(trials))
                order = sorted(range(len(trials)), key=lambda i: tuple(float(k[i]) for k in keys))
                top = order[-1]
                value = tuple(float(k[top]) for k in keys)
                if value > best:
                    best, current, changed = value, trials[top].clone(), True
            if not changed:
                break
        return current.tolist()

    def for_accuracy_drop(self, epsilon: float, reference_accuracy: float | None = None):
        """Cheapest thresholds whose validation accuracy is at least ``reference - epsilon``.

        ``epsilon`` is in accuracy units (0.005 = half a point); the reference is the
        last classifier's validation accuracy unless given. Where no thresholds reach
        the target, the most accurate ones found are returned.
        """
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        target = (
            float(self.correct[:, -1].mean()) if reference_accuracy is None else reference_accuracy
        ) - epsilon

        def score(acc, macs):
            feasible = acc >= target - 1e-12
            # feasible: cheaper is better; not (yet) feasible: closer to the target is better
            return (feasible.double(), torch.where(feasible, -macs, acc), acc)

        start = [float("inf")] * len(self.candidates)
        return self.rule(self._coordinate_search(start, score))

    def for_budget(self, macs_budget: float):
        """Most accurate thresholds whose mean validation MACs per sample stay within the budget.

        Where no thresholds fit the budget, the cheapest ones found are returned.
        """
        if not macs_budget > 0:
            raise ValueError(f"macs_budget must be > 0, got {macs_budget}")

        def score(acc, macs):
            feasible = macs <= macs_budget + 1e-9
            return (feasible.double(), torch.where(feasible, acc, -macs), -macs)

        start = [float("-inf")] * len(self.candidates)
        return self.rule(self._coordinate_search(start, score))

    def for_reward(self, alpha: float):
        """Thresholds with the best mean validation reward ``accuracy - alpha * MACs / reference``.

        The objective a stopping policy trained at cost weight ``alpha`` maximises (0/1
        loss, costs normalised to the most expensive classifier), so the rule and the
        policy can be compared, or the rule used to start the policy.
        """
        alpha = check_alpha(alpha)

        def score(acc, macs):
            return (acc - alpha * macs / self.reference_macs, -macs)

        start = [float("inf")] * len(self.candidates)
        return self.rule(self._coordinate_search(start, score))

    def sweep(self, points: int = 25) -> list[ThresholdRule]:
        """Rules along the trade-off curve: one shared confidence quantile level for all stages."""
        levels = torch.linspace(0, 1, points, dtype=torch.float64)
        rules = []
        for level in levels.tolist():
            thresholds = [
                float(torch.quantile(self.conf[:, t].double(), level))
                for t in range(len(self.candidates))
            ]
            rules.append(self.rule(thresholds))
        rules.append(self.rule([float("inf")] * len(self.candidates)))
        return rules


def oracle_exits(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exit at the first right stage (else the last): no policy beats it on these outputs."""
    return first_stop(probs.argmax(-1) == labels.unsqueeze(1))


def random_exits(
    num_samples: int, exit_distribution: list[float], generator: torch.Generator
) -> torch.Tensor:
    """Exit stages drawn independently of the input from a given distribution (matched cost)."""
    weights = torch.tensor(exit_distribution, dtype=torch.float64)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)
