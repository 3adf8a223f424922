"""One watch of a deployed rule: its exits (DriftWatch) and its first-stage score (ScoreWatch).

:class:`RuleWatch` runs both on the same stream, each at half the false-alarm level
(a union bound: the probability of any false alarm by either, over an unbounded clean
stream, is at most ``alpha_false_alarm``), and reports the first alarm of either with
what moved: an exit share or the mean cost (what the rule does: its spending), or the
rule's first-stage stop score (what comes in: an input shift, seen sooner). A rule with
no usable first-stage score (the largest classifier alone, a score constant on the
calibration samples), or with fewer than ``MIN_SCORE_CALIBRATION`` calibration scores,
is watched on its exits alone, at the whole level, and ``note``
says so. NumPy only; torch rules and numpy serving rules alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policycascade.watch import (
    FIRST_STAGE_SCORE,
    Alarm,
    DriftWatch,
    ScoreAlarm,
    ScoreWatch,
    exit_costs_of,
    first_stage_scores,
)

WATCHES = ("both", "exits", "score")  # what a RuleWatch watches: its ``mode``
# Fewest calibration scores for which mode "both" runs the score watch: its guarantee is
# marginal over the calibration draw, and given one small calibration set its false-alarm
# rate can be far above alpha (docs/watch.md: 12 of 20 clean digits streams, n = 270).
MIN_SCORE_CALIBRATION = 1000


@dataclass(frozen=True)
class WatchAlarm:
    """An alarm of a :class:`RuleWatch`: which watch raised it and the alarm itself."""

    watch: str  # "exits" (DriftWatch: an exit share or the mean cost) or "score" (ScoreWatch)
    alarm: Alarm | ScoreAlarm

    @property
    def samples_seen(self) -> int:
        """Stream samples up to and including the one that raised it."""
        return self.alarm.samples_seen

    @property
    def what(self) -> str:
        """One line: what moved, which way, after how many samples."""
        return self.alarm.what

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the watch's name and the alarm's fields."""
        return {"watch": self.watch, **self.alarm.as_dict()}


def split_alpha(alpha_false_alarm: float, mode: str, has_score: bool) -> dict[str, float]:
    """The false-alarm level of each watch run: half each for both, else the whole.

    ``mode`` "both" on a rule without a usable score runs the exits alone at the whole level.
    """
    if mode not in WATCHES:
        raise ValueError(f"watch must be one of {list(WATCHES)}, got {mode!r}")
    if not (isinstance(alpha_false_alarm, (int, float)) and 0 < alpha_false_alarm < 1):
        raise ValueError(f"alpha_false_alarm must be in (0, 1), got {alpha_false_alarm!r}")
    if mode == "score" and not has_score:
        raise ValueError("watch='score' needs a usable first-stage stop score; the rule has none")
    if mode == "both" and has_score:
        return {"exits": alpha_false_alarm / 2, "score": alpha_false_alarm / 2}
    return {"score" if mode == "score" else "exits": float(alpha_false_alarm)}


def usable_scores(rule, scores: np.ndarray) -> str | None:
    """Why ``scores`` (the rule's first-stage scores on calibration) cannot be watched, or None."""
    if getattr(rule, "skips_to_last", False):
        return "the rule runs the largest classifier alone: it has no first-stage stop score"
    if len(np.unique(scores)) < 2:
        return "the rule's first-stage stop score is constant on the calibration samples"
    return None


class RuleWatch:
    """Label-free drift watch of a deployed rule: its exits and its first-stage stop score.

    Args:
        exits: the exit watch, or None (``mode`` "score").
        scores: the score watch, or None (``mode`` "exits", or no usable score).
        rule: the watched rule, where known: lets :meth:`update_probs` apply it.
        note: why a watch is off, if one is ("" when both run, or as asked).

    Build it with :meth:`from_outputs` (calibration outputs) or :meth:`from_calibration`
    (a rule file's calibration block); they split ``alpha_false_alarm`` with
    :func:`split_alpha`.
    """

    def __init__(
        self,
        exits: DriftWatch | None,
        scores: ScoreWatch | None,
        rule: Any = None,
        note: str = "",
    ):
        if exits is None and scores is None:
            raise ValueError("a RuleWatch needs exits, scores or both; got neither")
        self.exits, self.scores, self.rule, self.note = exits, scores, rule, note

    @classmethod
    def from_outputs(
        cls,
        rule,
        calibration,
        alpha_false_alarm: float = 0.01,
        mode: str = "both",
        seed: int | None = 0,
        *,
        min_score_calibration: int = MIN_SCORE_CALIBRATION,
    ) -> RuleWatch:
        """The watch of ``rule`` (torch or serving rule) calibrated on cached clean outputs."""
        stages = rule_exit_stages(rule, calibration.probs)
        counts = np.bincount(stages, minlength=calibration.probs.shape[1])
        scores = first_stage_scores(rule, calibration.probs)
        return cls.from_calibration(
            rule,
            {"num_samples": int(counts.sum()), "exit_shares": (counts / counts.sum()).tolist()},
            rule_exit_costs(rule, calibration.costs),
            alpha_false_alarm,
            mode,
            scores,
            seed,
            min_score_calibration=min_score_calibration,
        )

    @classmethod
    def from_calibration(
        cls,
        rule,
        block: dict[str, Any],
        exit_costs: Sequence[float],
        alpha_false_alarm: float = 0.01,
        mode: str = "both",
        calibration_scores: Any = None,
        seed: int | None = 0,
        *,
        min_score_calibration: int = MIN_SCORE_CALIBRATION,
    ) -> RuleWatch:
        """The watch from a calibration block {num_samples, exit_shares, ...} and scores.

        ``calibration_scores``: the rule's first-stage scores on the same calibration
        samples, for the score watch. Without them (a rule file's block holds none), or
        with fewer than ``min_score_calibration``, ``mode`` "both" watches the exits alone
        at the whole level and ``note`` says so; "score" is refused without them (and
        runs on few, as asked).
        """
        if mode not in WATCHES:
            raise ValueError(f"watch must be one of {list(WATCHES)}, got {mode!r}")
        why = "no calibration scores were given (a rule file's calibration block has none)"
        if calibration_scores is not None:
            calibration_scores = np.asarray(calibration_scores, dtype=np.float64).ravel()
            why = usable_scores(rule, calibration_scores)
            n = len(calibration_scores)
            if why is None and mode == "both" and n < min_score_calibration:
                why = (
                    f"{n} calibration scores < min_score_calibration = {min_score_calibration}: "
                    "given one small calibration set, the score watch's false-alarm rate can be "
                    "far above its alpha"
                )
        if mode == "score" and why is not None:
            raise ValueError(f"watch='score' cannot run: {why}")
        alphas = split_alpha(alpha_false_alarm, mode, why is None)
        exits = scores = None
        if "exits" in alphas:
            exits = DriftWatch.from_calibration(block, exit_costs, alphas["exits"])
            if not hasattr(rule, "check_outputs"):  # DriftWatch.update_probs applies torch rules
                exits.rule = rule
        if "score" in alphas:
            scores = ScoreWatch(calibration_scores, alphas["score"], seed, FIRST_STAGE_SCORE)
        note = ""
        if mode == "both" and why is not None:
            note = f"score watch off: {why}; exits watched alone at alpha {alpha_false_alarm:g}"
        return cls(exits, scores, rule, note)

    @property
    def mode(self) -> str:
        """What runs: "both", "exits" or "score"."""
        if self.exits is not None and self.scores is not None:
            return "both"
        return "exits" if self.exits is not None else "score"

    @property
    def alpha_false_alarm(self) -> float:
        """The bound on any false alarm of either watch: the sum of their levels."""
        return sum(w.alpha_false_alarm for w in self._watches())

    def _watches(self) -> list[DriftWatch | ScoreWatch]:
        return [w for w in (self.exits, self.scores) if w is not None]

    def reset(self) -> None:
        """Forget the stream in both watches; keep the calibration."""
        for watch in self._watches():
            watch.reset()

    @property
    def samples_seen(self) -> int:
        """Stream samples seen since the last reset."""
        return self._watches()[0].samples_seen

    @property
    def alarms(self) -> list[WatchAlarm]:
        """Every alarm of either watch since the last reset, first raised first."""
        found = [WatchAlarm("exits", a) for a in (self.exits.alarms if self.exits else [])]
        found += [WatchAlarm("score", a) for a in (self.scores.alarms if self.scores else [])]
        return sorted(found, key=lambda a: (a.samples_seen, a.watch != "exits"))

    @property
    def alarm(self) -> WatchAlarm | None:
        """The first alarm of either watch since the last reset, None while there is none."""
        alarms = self.alarms
        return alarms[0] if alarms else None

    def update(self, exit_stages: Any = None, scores: Any = None) -> list[WatchAlarm]:
        """Feed the next samples' exit stages and first-stage scores, in order; new alarms.

        Each running watch needs its input (``exit_stages`` for the exits, ``scores`` for
        the score), one value per sample, the same samples in the same order.
        """
        if self.exits is not None and exit_stages is None:
            raise ValueError("update needs exit_stages: this RuleWatch watches the exits")
        if self.scores is not None and scores is None:
            raise ValueError("update needs scores: this RuleWatch watches the first-stage score")
        if self.exits is not None and self.scores is not None:
            n_exits, n_scores = len(np.atleast_1d(exit_stages)), len(np.ravel(scores))
            if n_exits != n_scores:
                raise ValueError(
                    f"exit_stages and scores must be one per sample: got {n_exits} and {n_scores}"
                )
        before = len(self.alarms)
        if self.exits is not None:
            self.exits.update(exit_stages)
        if self.scores is not None:
            self.scores.update(scores)
        return self.alarms[before:] if len(self.alarms) > before else []

    def update_probs(self, probs: Any) -> list[WatchAlarm]:
        """Feed softmaxes (batch, K, C) of the next samples through the watched rule."""
        if self.rule is None:
            raise ValueError("update_probs needs the watched rule: build with from_outputs")
        stages = rule_exit_stages(self.rule, probs) if self.exits is not None else None
        scores = first_stage_scores(self.rule, probs) if self.scores is not None else None
        return self.update(stages, scores)

    def statistics(self) -> dict[str, float]:
        """Tag-like keys for logging: the exit watch's and ``score/log10_evidence`` etc."""
        out: dict[str, float] = {}
        for watch in self._watches():
            out.update(watch.statistics())
        return out

    def describe(self) -> dict[str, Any]:
        """What runs at which level, and why a watch is off: JSON-ready."""
        return {
            "mode": self.mode,
            "alpha_false_alarm": self.alpha_false_alarm,
            "alpha_exits": self.exits.alpha_false_alarm if self.exits else None,
            "alpha_score": self.scores.alpha_false_alarm if self.scores else None,
            "score": FIRST_STAGE_SCORE if self.scores else None,
            "score_calibration_samples": self.scores.num_calibration if self.scores else None,
            "note": self.note,
        }


def rule_exit_stages(rule, probs) -> np.ndarray:
    """Exit stage (N,) int64 of each sample: a serving rule's (numpy) or a torch rule's."""
    if hasattr(rule, "check_outputs"):  # ServingRule
        if hasattr(probs, "detach"):
            probs = probs.detach().cpu().numpy()
        return rule.exit_stages(np.asarray(probs))
    import torch

    from policycascade.agents.rules import exit_stages

    if not hasattr(probs, "detach"):
        probs = torch.as_tensor(np.asarray(probs))
    return exit_stages(rule, probs).cpu().numpy().astype(np.int64)


def rule_exit_costs(rule, costs) -> list[float]:
    """:func:`exit_costs_of` for a torch rule, or a serving rule (through its torch form)."""
    if hasattr(rule, "check_outputs"):
        from policycascade.rule_io import rule_from_dict

        rule = rule_from_dict(rule.data)
    return exit_costs_of(rule, costs)
