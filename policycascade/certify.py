"""Certified operating points: stopping rules whose risk target holds with probability 1 - delta.

Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence testing: a path of rules runs
from a surely safe one (the largest classifier alone; the first stage alone for a budget) to
cheaper (or, for a budget, more accurate) ones; H_j: risk(rule_j) > target is tested in order
at level delta and the last rule before the first non-rejection is returned. The path must not
see the samples that test it: ``path="split"`` fits it with the existing threshold search on a
``path_share`` of the calibration samples, ``path="fixed"`` uses one threshold shared by every
stage on a grid fixed in advance (the default where the confidence lies in [0, 1]). Assumes
calibration and deployment samples are iid (exchangeable); it says nothing about a shifted
deployment distribution.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from policycascade.agents.rules import LargestOnlyRule, StoppingRule
from policycascade.cascade import CascadeOutputs
from policycascade.certify_bounds import BOUNDS, p_values
from policycascade.certify_paths import (
    DEFAULT_BOUND,
    FIXED_FAMILIES,
    Family,
    Target,
    answers_with_last_classifier,
    fixed_path,
    fixed_sequence,
    path_grid,
    path_p_values,
    split_path,
)

__all__ = [
    "Certified",
    "Family",
    "LargestOnlyRule",
    "Target",
    "certified_fit",
    "fixed_path",
    "fixed_sequence",
    "path_grid",
    "path_p_values",
    "split_path",
]


@dataclass
class Certified:
    """A rule fitted with a guarantee, and how it was certified."""

    rule: StoppingRule  # usable with evaluate_rule
    certified: bool  # False: fell back to the surely safe end of the path
    bound: str
    num_samples: int  # calibration samples that tested the path
    p_value: float  # of the returned rule (of the first path rule beyond it if none passed)
    target: Target
    delta: float
    needed_samples: int | None = None  # estimate when not certified; None: out of reach
    path_p_values: list[float] = field(default_factory=list)
    path: str = "split"
    message: str = ""

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports and the rule file."""
        return {
            "target": str(self.target),
            "delta": self.delta,
            "certified": self.certified,
            "bound": self.bound,
            "path": self.path,
            "num_samples": self.num_samples,
            "p_value": self.p_value,
            "needed_samples": self.needed_samples,
            "message": self.message,
        }


def _check(calibration, target, delta, bound, path, path_share, unlabelled_probs) -> None:
    if not isinstance(calibration, CascadeOutputs):
        raise TypeError(f"calibration must be CascadeOutputs, got {type(calibration).__name__}")
    if calibration.num_samples < 2:
        raise ValueError(f"calibration needs >= 2 samples, got {calibration.num_samples}")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {target!r}")
    if hasattr(delta, "item") and getattr(delta, "ndim", 1) == 0:
        delta = delta.item()
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a number in (0, 1), got {delta!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if bound != "auto" and bound not in BOUNDS:
        raise ValueError(f"bound must be 'auto' or one of {list(BOUNDS)}, got {bound!r}")
    if bound == "exact" and target.kind == "budget":
        raise ValueError("bound='exact' needs 0/1 losses; a budget's cost loss is continuous")
    if path not in ("auto", "split", "fixed", "both"):
        raise ValueError(f"path must be 'auto', 'split', 'fixed' or 'both', got {path!r}")
    if not 0 < path_share < 1:
        raise ValueError(f"path_share must be in (0, 1), got {path_share}")
    if unlabelled_probs is not None:
        if target.kind != "budget":
            raise ValueError(f"unlabelled_probs only count for a budget target, got {target}")
        if unlabelled_probs.ndim != 3 or unlabelled_probs.shape[1:] != calibration.probs.shape[1:]:
            raise ValueError(
                f"unlabelled_probs must be (sample, {calibration.num_stages}, "
                f"{calibration.num_classes}), got {tuple(unlabelled_probs.shape)}"
            )


def certified_fit(
    calibration: CascadeOutputs,
    target: Target,
    delta: float,
    family: str | StoppingRule = "max-softmax",
    bound: str = "auto",
    path: str = "auto",
    path_share: float = 0.5,
    seed: int = 0,
    unlabelled_probs: torch.Tensor | None = None,
) -> Certified:
    """The cheapest certified path rule: its risk target holds with probability >= 1 - delta.

    ``family`` is a criterion name (thresholds of its confidence) or any StoppingRule
    (offsets of its stop score, e.g. a learned rule). ``bound='auto'`` bets (Waudby-Smith &
    Ramdas) for a drop or a budget and uses the exact binomial test for an accuracy.
    ``path='auto'`` is ``both`` for max-softmax and softmax-margin, else ``split``
    (``path_share`` of the samples fit it). ``both`` certifies the ``fixed`` path (one
    shared threshold; every calibration sample tests) and the ``split`` path at delta / 2
    each and keeps the cheaper certified rule on the calibration samples: by the union
    bound both promises hold together with probability >= 1 - delta.
    ``unlabelled_probs`` (sample, K, C) join the test samples of a budget target.
    For a drop or an accuracy, the path's surely safe end is the largest classifier alone
    (:class:`LargestOnlyRule`, which skips the other stages and costs 100% of it); of the
    certified rules it returns the cheapest on the calibration samples. Where nothing beyond
    the safe end passes, it returns that end (the first stage alone for a budget) with
    ``certified=False`` and an estimate of the calibration samples needed.
    """
    _check(calibration, target, delta, bound, path, path_share, unlabelled_probs)
    bound = DEFAULT_BOUND[target.kind] if bound == "auto" else bound
    if path == "auto":
        path = "both" if isinstance(family, str) and family in FIXED_FAMILIES else "split"
    if path == "both":
        return _both_paths(
            calibration, target, delta, family, bound, path_share, seed, unlabelled_probs
        )
    return _one_path(
        calibration, target, float(delta), family, bound, path, path_share, seed, unlabelled_probs
    )


def _one_path(calibration, target, delta, family, bound, path, path_share, seed, unlabelled):
    """Fixed-sequence testing along one path (``fixed`` or ``split``)."""
    everyone, testing, thresholds = _path_and_tests(
        calibration, target, family, path, path_share, seed, unlabelled
    )
    p = path_p_values(testing, thresholds, target, delta, bound)
    last = fixed_sequence(p, delta)
    certified = last >= 1 or (last == 0 and target.kind == "accuracy")
    rule, p_value = _chosen_rule(calibration, family, everyone, thresholds, p, last, target)
    needed = None
    message = f"certified {target} at delta={delta:g} with {bound} on {len(testing.scores)} samples"
    if not certified:
        scale = calibration.num_samples / len(testing.scores)
        needed = _needed_samples(testing, thresholds, target, delta, bound, scale)
        message = _fallback_message(target, delta, calibration.num_samples, last, needed)
    elif isinstance(rule, LargestOnlyRule):
        message += "; the largest classifier alone is cheaper than every certified path rule"
    return Certified(
        rule=rule,
        certified=certified,
        bound=bound,
        num_samples=len(testing.scores),
        p_value=p_value,
        target=target,
        delta=delta,
        needed_samples=needed,
        path_p_values=[float(v) for v in p],
        path=path,
        message=message,
    )


def _path_and_tests(calibration, target, family, path, path_share, seed, unlabelled):
    """The family on every calibration sample, on the samples that test, and the path."""
    everyone = Family.of(family, calibration.probs, calibration.labels, calibration.costs)
    n = calibration.num_samples
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if path == "split":
        n_path = min(max(1, round(path_share * n)), n - 1)
        thresholds = split_path(everyone.subset(order[:n_path]).search(), target)
        testing = everyone.subset(order[n_path:])
    else:
        thresholds = fixed_path(family, calibration.num_stages, target)
        testing = everyone.subset(order)
    if unlabelled is not None:
        extra = Family.of(family, unlabelled, None, calibration.costs)
        testing = Family(
            torch.cat([testing.scores, extra.scores]),
            None,
            testing.cumulative,
            testing.reference_macs,
            testing.make_rule,
        )
    return everyone, testing, thresholds


def _chosen_rule(calibration, family, everyone, thresholds, p, last, target):
    """The returned rule and its p-value: the cheapest certified one, else the safe end.

    For a drop or an accuracy (family answering with the last classifier), the safe end
    is the largest classifier alone; the certified rules are the rejected prefix of the
    path (fixed-sequence testing rejects them all together with probability >= 1 - delta,
    so choosing among them by their label-free cost keeps the guarantee). Where none
    passed, the p-value is the first path rule's beyond the safe end.
    """
    certified = last >= 1 or (last == 0 and target.kind == "accuracy")
    beyond = float(p[min(last + 1, len(p) - 1)])
    if target.kind == "budget" or not answers_with_last_classifier(family):
        chosen = max(last, 0)
        rule = everyone.make_rule(thresholds[chosen].tolist())
        return rule, float(p[chosen]) if certified else beyond
    safe = LargestOnlyRule(calibration.num_stages)
    if not certified or last == 0:
        return safe, float(p[0]) if certified else beyond
    macs = everyone.cumulative[everyone.exits(thresholds[1 : last + 1])].mean(1)
    cheapest = int(torch.argmin(macs))
    if float(macs[cheapest]) >= float(calibration.costs.alone_macs[-1]):
        return safe, float(p[0])
    return everyone.make_rule(thresholds[1 + cheapest].tolist()), float(p[1 + cheapest])


def _fallback_message(target: Target, delta: float, n: int, last: int, needed) -> str:
    """What a fit that certified nothing beyond the safe end says."""
    fallback = "the first stage" if target.kind == "budget" else "the largest classifier"
    return (
        f"could not certify {target} at delta={delta:g} with {n} calibration samples; "
        f"fell back to {fallback} alone"
        + (" (itself not certified)" if last < 0 else "")
        + (
            f"; about {needed} calibration samples would certify the path's first rule"
            if needed
            else "; the path's first rule is out of reach"
        )
    )


def _both_paths(calibration, target, delta, family, bound, path_share, seed, unlabelled):
    """The fixed and the split path at delta / 2 each: the cheaper certified rule.

    When neither certifies, the fixed path's fallback (the surely safe end).
    """
    from policycascade.evaluation import evaluate_rule

    fits = [
        certified_fit(
            calibration, target, delta / 2, family, bound, way, path_share, seed, unlabelled
        )
        for way in ("fixed", "split")
    ]
    certified = [f for f in fits if f.certified]
    if not certified:
        chosen = fits[0]
    else:

        def cost(fit: Certified) -> float:
            metrics = evaluate_rule(fit.rule, calibration)
            # a budget target is met cheaply by any rule: prefer the more accurate one
            return -metrics["accuracy"] if target.kind == "budget" else metrics["mean_macs"]

        chosen = min(certified, key=cost)
    chosen.path = f"both ({chosen.path} chosen, delta/2 each)"
    chosen.delta = float(delta)
    return chosen


def _needed_samples(
    testing: Family, path: torch.Tensor, target: Target, delta: float, bound: str, scale: float
) -> int | None:
    """Calibration samples that would certify the path's first non-trivial rule.

    Its test losses are repeated to n * r samples (same mean and spread) and the smallest r
    found by doubling and bisection; the answer is scaled by calibration / test samples.
    """
    row = 0 if target.kind == "accuracy" else 1
    if row >= len(path):
        return None
    losses, low, high = testing.losses(target, testing.exits(path[row : row + 1]))
    risk = testing.risk_target(target)
    if losses.mean() >= risk:
        return None

    def passes(size: int) -> bool:
        return bool(
            p_values(bound, np.resize(losses, (1, size)), risk, low, high, delta)[0] <= delta
        )

    n = losses.shape[1]
    hi = n
    while not passes(hi):
        hi *= 2
        if hi > 100 * n:
            return None
    lo = hi // 2
    while hi - lo > max(1, hi // 100):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return math.ceil(hi * scale)
