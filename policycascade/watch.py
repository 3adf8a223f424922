"""A label-free drift watch for a deployed stopping rule: anytime-valid tests on its exit stages.

A rule fitted on clean calibration data exits a known share of samples at each stage
and so spends a known mean cost. Under distribution shift both move (and accuracy with
them), while no label arrives to say so. :class:`DriftWatch` reads the exit stages of a
stream and raises an :class:`Alarm` as soon as the stream's share of exits at some
stage, or its mean normalised cost, is no longer the calibration one.

The guarantee: if the calibration samples and the stream are i.i.d. draws from one
distribution, the probability that the watch *ever* raises an alarm, over an unbounded
stream, is at most ``alpha_false_alarm``. It holds with a finite calibration set:

- each of the Q = K + 1 quantities (K exit shares, the mean cost) is a mean of a
  per-sample value in [0, 1] (an exit indicator; the sample's cost divided by the
  largest exit cost);
- the calibration counts give, per quantity, a lower and an upper confidence bound
  (Hoeffding's KL bound for [0, 1] values, at the fixed calibration size), each
  missing with probability ``alpha * calibration_share / (2 Q)``;
- per quantity and direction, a test martingale bets that the stream's mean lies above
  the upper bound (or below the lower one): Waudby-Smith & Ramdas (2023) betting with
  predictable bets, here the Bernoulli Kelly bet at the mean of the last ``w`` samples
  (shrunk towards the bound), averaged over a few windows ``w``. By Ville's inequality
  it ever reaches ``2 Q / (alpha * (1 - calibration_share))`` with at most that
  probability while the stream's mean is inside the bounds;
- a union bound over the 2 Q calibration bounds and 2 Q martingales gives ``alpha``.

Windowed bets stay near 0 on a clean stream, so the wealth does not sink while
nothing moves, and they follow a shift that starts late within about a window.
Bets read only earlier samples and sums run in stream order, so a batched update gives
exactly the alarms of one sample at a time. NumPy only.

:class:`ScoreWatch` (below) tests a per-sample score instead, the rule's first-stage stop
score by default, with a conformal test martingale; :class:`policycascade.watch_combined.
RuleWatch` runs both at half the level each.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DIRECTIONS = ("up", "down")
WINDOWS = (100, 1000, 10000)  # samples whose mean sets the next bet; one martingale each
PRIOR_SAMPLES = 5  # pseudo-samples at the bound that shrink a young window's mean
MAX_BET = 0.5  # share of the largest bet that keeps the wealth positive
RECENT = 300  # samples an alarm's ``recent`` value is measured on
_CHUNK = 4096  # samples per vectorised step, to bound memory


@dataclass(frozen=True)
class Alarm:
    """One statistic of the stream that left its calibration interval, and where it went."""

    quantity: str  # "exit_share" or "mean_cost"
    stage: int | None  # the exit stage of an exit share; None for the mean cost
    direction: str  # "up" or "down"
    observed: float  # the stream's value over the samples seen
    recent: float  # the stream's value over the last RECENT samples seen
    expected: float  # the calibration value
    expected_low: float  # calibration confidence interval
    expected_high: float
    samples_seen: int  # stream samples up to and including the one that raised it

    @property
    def what(self) -> str:
        """One line: what moved, which way, observed against expected, after how many samples."""
        name = "mean cost" if self.stage is None else f"exit share of stage {self.stage}"
        return (
            f"{name} went {self.direction}: {self.observed:.4g} in the stream "
            f"({self.recent:.4g} recently) vs "
            f"{self.expected:.4g} [{self.expected_low:.4g}, {self.expected_high:.4g}] at "
            f"calibration, after {self.samples_seen} samples"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the one-line description."""
        return {**asdict(self), "what": self.what}


class DriftWatch:
    """Sequential, label-free test that a rule's exit shares and mean cost stay as calibrated.

    Args:
        exit_shares: K shares of calibration samples exiting at each stage (sum 1).
        exit_costs: K costs of a sample exiting at each stage, in any unit (e.g. the
            cumulative MACs, or their share of the largest classifier's); >= 0, max > 0.
        num_calibration: calibration samples the shares were measured on; the shares
            times it must be whole counts (shares may be rounded, see ``tolerance``).
        alpha_false_alarm: bound on the probability of any false alarm over an unbounded
            stream drawn i.i.d. from the calibration distribution.
        mean_cost: the calibration mean cost in ``exit_costs``' unit, if known; only
            checked against ``sum(exit_shares * exit_costs)``.
        calibration_share: part of ``alpha_false_alarm`` spent on the calibration bounds.
        tolerance: how far shares times ``num_calibration`` may be from whole counts, as a
            share of ``num_calibration`` (less than half a count), and the relative
            tolerance of the ``mean_cost`` check.
    """

    def __init__(
        self,
        exit_shares: Sequence[float],
        exit_costs: Sequence[float],
        num_calibration: int,
        alpha_false_alarm: float = 0.01,
        mean_cost: float | None = None,
        calibration_share: float = 0.5,
        tolerance: float = 1e-3,
    ):
        costs, whole = _checked_calibration(
            exit_shares,
            exit_costs,
            num_calibration,
            (alpha_false_alarm, calibration_share, mean_cost),
            tolerance,
        )
        self.calibration_counts = whole.astype(np.int64)
        self.num_calibration = int(num_calibration)
        self.exit_costs = costs
        self.alpha_false_alarm = float(alpha_false_alarm)
        self.calibration_share = float(calibration_share)
        # Per quantity, its value for a sample exiting at each stage: (Q, K), in [0, 1].
        self._values = np.vstack([np.eye(len(costs)), costs / costs.max()])
        expected = self._values @ self.calibration_counts / self.num_calibration
        self.expected = np.asarray(expected, dtype=np.float64)  # (Q,) calibration means in [0, 1]
        self._threshold, self.expected_low, self.expected_high = _calibration_bounds(
            self.expected, self.num_calibration, self.alpha_false_alarm, self.calibration_share
        )
        self.rule = None  # the watched rule, where known: lets update_probs apply it
        self.reset()

    @classmethod
    def from_outputs(
        cls, rule, calibration, alpha_false_alarm: float = 0.01, **options: Any
    ) -> DriftWatch:
        """The watch of ``rule`` calibrated on cached outputs (a clean validation split, say).

        Costs are the outputs' (MACs, say) spent up to each exit: see :func:`exit_costs_of`.
        """
        from policycascade.agents.rules import exit_stages

        stages = exit_stages(rule, calibration.probs).cpu().numpy()
        k = calibration.probs.shape[1]
        counts = np.bincount(stages, minlength=k)
        watch = cls(
            counts / counts.sum(),
            exit_costs_of(rule, calibration.costs),
            int(counts.sum()),
            alpha_false_alarm,
            **options,
        )
        watch.rule = rule
        return watch

    @classmethod
    def from_calibration(
        cls,
        block: dict[str, Any],
        exit_costs: Sequence[float],
        alpha_false_alarm: float = 0.01,
        **options: Any,
    ) -> DriftWatch:
        """The watch from a rule file's ``calibration`` block {num_samples, exit_shares, ...}.

        ``mean_cost``, when the block has it, is checked against the shares and
        ``exit_costs`` (which must then be in its unit).
        """
        if not isinstance(block, dict):
            raise TypeError(f"calibration must be a dict, got {type(block).__name__}")
        missing = [key for key in ("num_samples", "exit_shares") if key not in block]
        if missing:
            raise ValueError(f"calibration lacks {missing}; it has {sorted(block)}")
        return cls(
            block["exit_shares"],
            exit_costs,
            block["num_samples"],
            alpha_false_alarm,
            mean_cost=block.get("mean_cost"),
            **options,
        )

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.exit_costs)

    @property
    def num_quantities(self) -> int:
        """Watched statistics: K exit shares and the mean cost."""
        return self.num_stages + 1

    def reset(self) -> None:
        """Forget the stream (counts, alarms); keep the calibration."""
        self._stream = _StreamCounts(self.num_stages)
        self.alarms: list[Alarm] = []
        self._raised = np.zeros(2 * self.num_quantities, dtype=bool)
        self._bets = _Martingales(self._values, self.expected_low, self.expected_high)

    @property
    def counts(self) -> np.ndarray:
        """Exit counts of the stream since the last reset, one per stage."""
        return self._stream.counts

    @property
    def samples_seen(self) -> int:
        """Stream samples seen since the last reset."""
        return int(self.counts.sum())

    @property
    def alarm(self) -> Alarm | None:
        """The first alarm raised since the last reset, None while there is none."""
        return self.alarms[0] if self.alarms else None

    def update(self, exit_stages: Any) -> list[Alarm]:
        """Feed the exit stages of the next stream samples, in order; returns the new alarms.

        Each statistic and direction alarms once until :meth:`reset`; an alarm records
        the sample at which its test crossed, whatever the batch size.
        """
        stages = _check_stages(exit_stages, self.num_stages)
        new = []
        for start in range(0, len(stages), _CHUNK):
            new += self._update_chunk(stages[start : start + _CHUNK])
        self.alarms += new
        return new

    def update_probs(self, probs: Any) -> list[Alarm]:
        """Feed softmaxes (batch, K, C) of the next samples: the watched rule's exits of them."""
        if self.rule is None:
            raise ValueError(
                "update_probs needs the watched rule: build the watch with from_outputs or set "
                "watch.rule"
            )
        from policycascade.agents.rules import exit_stages

        return self.update(exit_stages(self.rule, probs))

    def _update_chunk(self, stages: np.ndarray) -> list[Alarm]:
        before = self.samples_seen
        log_wealth = self._bets.advance(self._stream, stages)  # (batch, windows, 2Q)
        mixture = _log_mean_exp(log_wealth, axis=1)  # (batch, 2Q)
        crossed = (mixture >= self._threshold) & ~self._raised
        new = []
        for test in np.flatnonzero(crossed.any(axis=0)):
            at = before + int(np.argmax(crossed[:, test])) + 1  # samples seen at the alarm
            new.append(self._alarm(int(test), at))
            self._raised[test] = True
        new.sort(key=lambda a: (a.samples_seen, a.stage is None, a.stage or 0))
        if len(stages):
            self._bets.log_wealth = log_wealth[-1]
        return new

    def _alarm(self, test: int, at: int) -> Alarm:
        """The alarm of ``test`` (quantity * 2 + direction), crossed at ``at`` samples seen."""
        q, d = divmod(test, 2)
        seen = self._stream.at(at)
        last = seen - self._stream.at(max(at - RECENT, 0))
        low, high = self.expected_low[q], self.expected_high[q]
        return Alarm(
            quantity="mean_cost" if q == self.num_stages else "exit_share",
            stage=None if q == self.num_stages else q,
            direction=DIRECTIONS[d],
            observed=self._in_units(q, float(self._values[q] @ seen) / at),
            recent=self._in_units(q, float(self._values[q] @ last) / last.sum()),
            expected=self._in_units(q, float(self.expected[q])),
            expected_low=self._in_units(q, float(low)),
            expected_high=self._in_units(q, float(high)),
            samples_seen=at,
        )

    def _in_units(self, quantity: int, value: float) -> float:
        return float(value * self.exit_costs.max() if quantity == self.num_stages else value)

    def statistics(self) -> dict[str, float]:
        """The stream's exit shares and mean cost so far and each test's evidence (log10 wealth).

        Tag-like keys (``exit_share/stage0``, ``mean_cost``, ``evidence/mean_cost_up``, ...)
        for logging; evidence reaching ``log10_threshold`` raises that test's alarm.
        """
        n = max(self.samples_seen, 1)
        out = {f"exit_share/stage{k}": float(c) / n for k, c in enumerate(self.counts)}
        out["mean_cost"] = float(self.counts @ self.exit_costs) / n
        log_wealth = _log_mean_exp(self._bets.log_wealth, axis=0) / math.log(10)
        names = [f"exit_share_stage{k}" for k in range(self.num_stages)] + ["mean_cost"]
        for test, value in enumerate(log_wealth):
            out[f"evidence/{names[test // 2]}_{DIRECTIONS[test % 2]}"] = float(value)
        out["log10_threshold"] = self._threshold / math.log(10)
        return out

    def calibration(self) -> dict[str, Any]:
        """What the watch expects: counts, shares and mean cost with their confidence bounds."""
        k = self.num_stages
        return {
            "num_samples": self.num_calibration,
            "exit_shares": (self.calibration_counts / self.num_calibration).tolist(),
            "exit_share_bounds": list(
                zip(self.expected_low[:k].tolist(), self.expected_high[:k].tolist(), strict=True)
            ),
            "exit_costs": self.exit_costs.tolist(),
            "mean_cost": self._in_units(k, float(self.expected[k])),
            "mean_cost_bounds": [
                self._in_units(k, float(self.expected_low[k])),
                self._in_units(k, float(self.expected_high[k])),
            ],
            "alpha_false_alarm": self.alpha_false_alarm,
        }


class _Martingales:
    """Per test (quantity q, direction d; index 2 q + d), one betting martingale per window.

    Each bets that the stream's mean lies above the quantity's upper calibration bound
    (d = 0) or below its lower one (d = 1): the Bernoulli Kelly bet at the mean of the
    previous ``w`` samples, shrunk towards the bound, capped at ``MAX_BET`` of the largest
    safe bet.
    """

    def __init__(self, values: np.ndarray, low: np.ndarray, high: np.ndarray):
        self._values = values  # (Q, K): each quantity's value for an exit at each stage
        self._null = np.stack([high, low], axis=1).reshape(-1)
        self._sign = np.tile([1.0, -1.0], len(low))
        room = np.where(self._sign > 0, self._null, 1 - self._null)  # largest bet: 1 / room
        self._max_bet = np.where(room > 0, MAX_BET / np.maximum(room, 1e-300), 0.0)
        self._kelly_scale = 1 / np.maximum(self._null * (1 - self._null), 1e-300)
        self.log_wealth = np.zeros((len(WINDOWS), 2 * len(low)))

    def advance(self, stream: _StreamCounts, stages: np.ndarray) -> np.ndarray:
        """Every martingale's log wealth after each of ``stages``: (batch, windows, 2Q).

        The bet on each sample reads the window of samples before it only (predictable).
        """
        before = int(stream.counts.sum()) + np.arange(len(stages))  # samples before each one
        stream.append(stages)
        value = np.repeat(self._values[:, stages].T, 2, axis=1)  # (batch, 2Q)
        factors = []
        for window in WINDOWS:
            start = np.maximum(before - window, 0)
            in_window = (stream.at(before) - stream.at(start)).astype(np.float64)
            window_sum = np.repeat(self._sums(in_window), 2, axis=1)  # (batch, 2Q)
            size = (before - start).astype(np.float64)[:, None]
            mean = (window_sum + PRIOR_SAMPLES * self._null) / (size + PRIOR_SAMPLES)
            bet = np.clip(self._sign * (mean - self._null) * self._kelly_scale, 0, self._max_bet)
            factors.append(np.log1p(self._sign * bet * (value - self._null)))
        factors = np.stack(factors, axis=1)  # (batch, windows, 2Q)
        # summed in stream order from the running wealth: the same floats for any batching
        return np.cumsum(np.concatenate([self.log_wealth[None], factors]), axis=0)[1:]

    def _sums(self, counts: np.ndarray) -> np.ndarray:
        """Each quantity's sum over samples with these exit counts: (n, K) -> (n, Q)."""
        total = np.zeros((len(counts), self._values.shape[0]))
        # one fixed order of stages: the same floats for any batching
        for stage in range(self._values.shape[1]):
            total += counts[:, stage, None] * self._values[None, :, stage]
        return total


class _StreamCounts:
    """Cumulative exit counts of a stream after 0, 1, 2, ... samples, for the recent rows only.

    The rows the windows (and an alarm's ``recent`` value) read, in a buffer that moves
    its tail to the front when full.
    """

    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self.counts = np.zeros(num_stages, dtype=np.int64)
        self._rows = np.zeros((4 * (max(*WINDOWS, RECENT) + 1), num_stages), np.int64)
        self._used, self._start = 1, 0  # rows filled; the sample count of row 0

    def at(self, time: int | np.ndarray) -> np.ndarray:
        """Exit counts of the first ``time`` stream samples (kept for the last windows only)."""
        return self._rows[time - self._start]

    def append(self, stages: np.ndarray) -> None:
        """Extend the cumulative exit counts by ``stages``, keeping the rows windows still read."""
        keep = min(self._used, max(WINDOWS) + 1)
        if self._used + len(stages) > len(self._rows):
            rows = self._rows[self._used - keep : self._used]
            capacity = max(len(self._rows), keep + len(stages))
            self._rows = np.zeros((capacity, self.num_stages), dtype=np.int64)
            self._rows[:keep] = rows
            self._start += self._used - keep
            self._used = keep
        end = self._used + len(stages)
        counts = np.cumsum(_one_hot(stages, self.num_stages), axis=0)
        self._rows[self._used : end] = self.counts + counts
        self._used = end
        self.counts = self._rows[end - 1].copy()


def _checked_calibration(
    exit_shares, exit_costs, num_calibration, levels, tolerance
) -> tuple[np.ndarray, np.ndarray]:
    """DriftWatch's arguments checked: (exit costs, whole calibration counts), or an error.

    ``levels``: (alpha_false_alarm, calibration_share, mean_cost or None).
    """
    alpha_false_alarm, calibration_share, mean_cost = levels
    shares = np.asarray(exit_shares, dtype=np.float64)
    costs = np.asarray(exit_costs, dtype=np.float64)
    if shares.ndim != 1 or len(shares) < 2:
        raise ValueError(f"exit_shares needs K >= 2 shares, got {list(np.atleast_1d(shares))}")
    k = len(shares)
    if not (np.all(np.isfinite(shares)) and np.all(shares >= 0)) or abs(shares.sum() - 1) > 1e-3:
        raise ValueError(f"exit_shares must be >= 0 and sum to 1, got {shares.tolist()}")
    if costs.shape != (k,) or not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(f"exit_costs needs {k} finite costs >= 0, got {list(exit_costs)}")
    if not costs.max() > 0:
        raise ValueError(f"exit_costs must not all be 0, got {costs.tolist()}")
    if isinstance(num_calibration, bool) or not isinstance(num_calibration, (int, np.integer)):
        raise TypeError(f"num_calibration must be an int, got {num_calibration!r}")
    if num_calibration < 1:
        raise ValueError(f"num_calibration must be >= 1, got {num_calibration}")
    if not (isinstance(alpha_false_alarm, (int, float)) and 0 < alpha_false_alarm < 1):
        raise ValueError(f"alpha_false_alarm must be in (0, 1), got {alpha_false_alarm!r}")
    if not (isinstance(calibration_share, (int, float)) and 0 < calibration_share < 1):
        raise ValueError(f"calibration_share must be in (0, 1), got {calibration_share!r}")
    counts = shares * num_calibration
    whole = np.round(counts)
    if np.any(np.abs(counts - whole) > min(0.49, max(1e-6, tolerance * num_calibration))):
        raise ValueError(
            f"exit_shares times num_calibration={num_calibration} must be whole counts, "
            f"got {counts.tolist()}"
        )
    if whole.sum() != num_calibration:
        raise ValueError(
            f"exit_shares times num_calibration={num_calibration} must count "
            f"{num_calibration} samples, got {int(whole.sum())}"
        )
    if mean_cost is not None:
        computed = float(shares @ costs)
        if not math.isclose(float(mean_cost), computed, rel_tol=tolerance, abs_tol=1e-12):
            raise ValueError(
                f"mean_cost={mean_cost!r} is not sum(exit_shares * exit_costs) = {computed:.6g}"
            )
    return costs, whole


def _calibration_bounds(
    expected: np.ndarray, n: int, alpha: float, calibration_share: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """The martingales' log threshold and each quantity's calibration bounds (low, high).

    2 Q calibration bounds at ``alpha * calibration_share / (2 Q)`` each, 2 Q martingales
    sharing the rest of ``alpha`` (module docstring).
    """
    num_tests = 2 * len(expected)
    threshold = math.log(num_tests / (alpha * (1 - calibration_share)))
    bounds = [kl_bounds(float(e), n, alpha * calibration_share / num_tests) for e in expected]
    return threshold, np.array([lo for lo, _ in bounds]), np.array([hi for _, hi in bounds])


def exit_costs_of(rule, costs) -> list[float]:
    """Cost of a sample exiting at each stage under ``rule``, in the costs' unit (MACs, say).

    Every stage up to the exit ran, stopping modules included (the last classifier alone
    for a rule that skips to it), as :func:`policycascade.evaluation.exit_costs` charges
    them and as in a rule file's ``calibration.mean_cost``.
    """
    from policycascade.evaluation import exit_costs  # the one cost rule (imports torch)

    return [float(m) for m in exit_costs(rule, costs)]


def _check_stages(exit_stages: Any, num_stages: int) -> np.ndarray:
    if hasattr(exit_stages, "detach"):  # a torch tensor, without importing torch
        exit_stages = exit_stages.detach().cpu().numpy()
    stages = np.asarray(exit_stages)
    if stages.ndim != 1:
        raise ValueError(
            f"exit_stages must be one stage per sample (1-D), got shape {stages.shape}"
        )
    if stages.size and not np.issubdtype(stages.dtype, np.integer):
        raise TypeError(f"exit_stages must be integers, got dtype {stages.dtype}")
    if stages.size and (stages.min() < 0 or stages.max() >= num_stages):
        raise ValueError(
            f"exit_stages must lie in [0, {num_stages}), got values from {stages.min()} "
            f"to {stages.max()}"
        )
    return stages.astype(np.int64)


def _one_hot(stages: np.ndarray, num_stages: int) -> np.ndarray:
    out = np.zeros((len(stages), num_stages), dtype=np.int64)
    out[np.arange(len(stages)), stages] = 1
    return out


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.exp(x - peak).mean(axis=axis))


def bernoulli_kl(p: float, q: float) -> float:
    """KL divergence between Bernoulli(p) and Bernoulli(q), in nats."""

    def term(a: float, b: float) -> float:
        return 0.0 if a == 0 else (math.inf if b == 0 else a * math.log(a / b))

    return term(p, q) + term(1 - p, 1 - q)


def kl_bounds(mean: float, n: int, level: float) -> tuple[float, float]:
    """Lower and upper confidence bounds on the mean of n i.i.d. values in [0, 1].

    Hoeffding (1963): P(sample mean >= mu + e) <= exp(-n kl(mu + e, mu)), and the same
    below, so each bound {m : n kl(mean, m) <= log(1 / level)} misses with probability
    <= level (Clopper-Pearson's bound up to a factor of order sqrt(n) in level, for
    any values in [0, 1]). Found by bisection: kl grows as m moves away from the mean.
    """
    budget = math.log(1 / level) / n

    def bisect(outside: float) -> float:
        inside = mean
        for _ in range(60):
            middle = 0.5 * (inside + outside)
            if bernoulli_kl(mean, middle) > budget:
                outside = middle
            else:
                inside = middle
        return inside

    return bisect(0.0), bisect(1.0)


SCORE_BINS = 10  # histogram bins of the conformal p-values a ScoreWatch bets on
SCORE_WINDOWS = (100, 1000)  # previous p-values each of its martingales' histogram reads
SCORE_PRIOR = 5.0  # pseudo-count per bin of those histograms


@dataclass(frozen=True)
class ScoreAlarm:
    """A ScoreWatch alarm: the stream's scores no longer follow their calibration distribution."""

    direction: str  # "up": recent scores rank high among all scores so far; "down": low
    recent_rank: float  # mean conformal p-value of the last RECENT samples (0.5 expected)
    samples_seen: int
    name: str = "score"  # what the score is, for ``what``

    @property
    def what(self) -> str:
        """One line: which score moved which way, after how many samples."""
        return (
            f"{self.name} moved {self.direction}: recent samples rank "
            f"{self.recent_rank:.3f} on average (0.5 expected), after {self.samples_seen} samples"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the one-line description."""
        return {**asdict(self), "what": self.what}


class ScoreWatch:
    """Anytime-valid, label-free two-sample test of a per-sample score against its calibration.

    A conformal test martingale (Vovk, Nouretdinov & Gammerman 2003): each stream sample's
    p-value is the share of the calibration and stream scores so far (itself included)
    above its own, ties broken at random. If calibration and stream samples are
    exchangeable these p-values are i.i.d. uniform, whatever the score's distribution, so
    no calibration bound spends any of ``alpha_false_alarm``. It bets on them with the
    histogram (``SCORE_BINS`` bins, ``SCORE_PRIOR`` pseudo-counts each) of the previous
    ``w`` p-values, mixed half and half with the uniform density: one martingale per window of
    ``SCORE_WINDOWS``, averaged; by Ville's inequality the average ever reaches
    ``1 / alpha_false_alarm`` with at most that probability. The score: any label-free
    number per sample (+-inf allowed, NaN not), e.g. the rule's stop score at the first
    stage (every sample runs it), which sees an input shift before the exit shares move.
    The tie-breaking draws come from ``seed``'s generator, which :meth:`reset` does not
    rewind: a restarted watch breaks ties with fresh draws.
    """

    def __init__(
        self,
        calibration_scores: Any,
        alpha_false_alarm: float = 0.01,
        seed: int | None = 0,
        name: str = "score",
    ):
        scores = np.asarray(calibration_scores, dtype=np.float64).ravel()
        if len(scores) < 1 or np.any(np.isnan(scores)):
            raise ValueError(
                f"calibration_scores must be >= 1 numbers without NaN, got {len(scores)} "
                f"({int(np.isnan(scores).sum())} NaN)"
            )
        if not (isinstance(alpha_false_alarm, (int, float)) and 0 < alpha_false_alarm < 1):
            raise ValueError(f"alpha_false_alarm must be in (0, 1), got {alpha_false_alarm!r}")
        self.calibration_scores = np.sort(scores)
        self.alpha_false_alarm, self.seed, self.name = float(alpha_false_alarm), seed, name
        self._rng = np.random.default_rng(seed)
        self.reset()

    @classmethod
    def from_outputs(
        cls, rule, calibration, alpha_false_alarm: float = 0.01, seed: int | None = 0
    ) -> ScoreWatch:
        """The watch of ``rule``'s first-stage stop score, calibrated on cached outputs."""
        scores = first_stage_scores(rule, calibration.probs)
        return cls(scores, alpha_false_alarm, seed, FIRST_STAGE_SCORE)

    @property
    def num_calibration(self) -> int:
        """Calibration scores the stream is ranked against (with the stream so far)."""
        return len(self.calibration_scores)

    def reset(self) -> None:
        """Forget the stream: the reference is the calibration scores again."""
        self._reference = self.calibration_scores.tolist()  # sorted
        self._bins: deque[int] = deque(maxlen=max(SCORE_WINDOWS) + 1)  # recent p-value bins
        self._counts = [[0] * SCORE_BINS for _ in SCORE_WINDOWS]  # recent p-values per bin
        self._log_wealth = [0.0] * len(SCORE_WINDOWS)
        self.p_values: list[float] = []
        self.alarm: ScoreAlarm | None = None

    @property
    def samples_seen(self) -> int:
        """Stream samples seen since the last reset."""
        return len(self.p_values)

    @property
    def alarms(self) -> list[ScoreAlarm]:
        """The alarm as a list (empty or one), like :attr:`DriftWatch.alarms`."""
        return [] if self.alarm is None else [self.alarm]

    def update(self, scores: Any) -> ScoreAlarm | None:
        """Feed the next samples' scores, in order; returns the alarm if one was raised now."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if np.any(np.isnan(values)):
            raise ValueError(f"scores must be numbers, got {int(np.isnan(values).sum())} NaN")
        before = self.alarm
        uniforms = self._rng.uniform(size=len(values)).tolist()
        for z, u in zip(values.tolist(), uniforms, strict=True):
            self._one(z, u)
        return self.alarm if self.alarm is not before else None

    def _one(self, z: float, u: float) -> None:
        """One sample: its conformal p-value (ties broken by ``u``), then every bet on it."""
        bisect.insort(self._reference, z)
        low, high = bisect.bisect_left(self._reference, z), bisect.bisect_right(self._reference, z)
        n = len(self._reference)
        p = (n - high + u * (high - low)) / n  # share above, plus a random share of the ties
        b = min(int(p * SCORE_BINS), SCORE_BINS - 1)
        self.p_values.append(p)
        self._bins.append(b)
        for j, w in enumerate(SCORE_WINDOWS):
            counts = self._counts[j]
            seen = min(len(self._bins) - 1, w)  # p-values before this one in the window
            density = (counts[b] + SCORE_PRIOR) / (seen + SCORE_PRIOR * SCORE_BINS) * SCORE_BINS
            self._log_wealth[j] += math.log(0.5 + 0.5 * density)
            counts[b] += 1
            if len(self._bins) > w:
                counts[self._bins[-w - 1]] -= 1
        if self.alarm is None and self.log10_evidence() >= math.log10(1 / self.alpha_false_alarm):
            recent = sum(self.p_values[-RECENT:]) / min(len(self.p_values), RECENT)
            direction = "up" if recent < 0.5 else "down"
            self.alarm = ScoreAlarm(direction, recent, self.samples_seen, self.name)

    def log10_evidence(self) -> float:
        """log10 of the averaged martingale's wealth (alarm at log10(1 / alpha))."""
        peak = max(self._log_wealth)
        mean = sum(math.exp(v - peak) for v in self._log_wealth) / len(self._log_wealth)
        return (peak + math.log(mean)) / math.log(10)

    def statistics(self) -> dict[str, float]:
        """Tag-like keys for logging: ``score/log10_evidence``, its threshold, the recent rank."""
        recent = self.p_values[-RECENT:]
        return {
            "score/log10_evidence": self.log10_evidence(),
            "score/log10_threshold": math.log10(1 / self.alpha_false_alarm),
            "score/recent_rank": sum(recent) / len(recent) if recent else 0.5,
        }


FIRST_STAGE_SCORE = "first-stage stop score"


def first_stage_scores(rule, probs) -> np.ndarray:
    """The rule's stop score at the first stage of each sample, (N,) float64 (label-free).

    ``rule``: a torch rule (``stop_scores`` on a tensor) with ``probs`` a tensor (an array
    is converted), or a numpy :class:`policycascade.serving.ServingRule` with ``probs``
    an array (a tensor is converted). Only the first stage's softmaxes are read.
    """
    if hasattr(rule, "check_outputs"):  # a ServingRule: numpy in, numpy out
        if hasattr(probs, "detach"):
            probs = probs.detach().cpu().numpy()
        return np.asarray(rule.stop_scores(np.asarray(probs)[:, :1]), dtype=np.float64)[:, 0]
    if not hasattr(probs, "detach"):
        import torch

        probs = torch.as_tensor(np.asarray(probs))
    return rule.stop_scores(probs[:, :1]).double().cpu().numpy()[:, 0]
