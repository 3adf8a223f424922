"""Comparing accuracy-vs-cost curves: Pareto envelope, MACs at an accuracy, area, mean and std.

An operating point is ``(accuracy, mean_macs)``: one stopping rule's test
accuracy and mean MACs per sample. A curve is any collection of such points
(a list of pairs or an (M, 2) tensor); only its Pareto envelope counts.
Between two adjacent envelope points the curve is read linearly: sending each
sample to one rule or the other at random reaches every mixture of the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch

Point = tuple[float, float]  # (accuracy, mean_macs)
Points = Sequence[Sequence[float]] | torch.Tensor


def _as_points(points: Points) -> list[Point]:
    if isinstance(points, torch.Tensor):
        points = points.tolist()
    out = []
    for point in points:
        if len(point) != 2:
            raise ValueError(f"an operating point is (accuracy, mean_macs), got {point!r}")
        accuracy, macs = float(point[0]), float(point[1])
        if not (math.isfinite(accuracy) and math.isfinite(macs)):
            raise ValueError(f"operating points must be finite, got {point!r}")
        out.append((accuracy, macs))
    return out


def pareto_envelope(points: Points) -> list[Point]:
    """The points no other point beats (as accurate for fewer MACs), sorted by MACs.

    The upper-left envelope: along it MACs and accuracy both strictly increase;
    dominated points and duplicates are dropped.
    """
    envelope: list[Point] = []
    for accuracy, macs in sorted(_as_points(points), key=lambda p: (p[1], -p[0])):
        if not envelope or accuracy > envelope[-1][0]:
            envelope.append((accuracy, macs))
    return envelope


def macs_at_accuracy(points: Points, accuracy: float) -> float | None:
    """The fewest MACs at which the envelope reaches ``accuracy``; None if it never does.

    Linear interpolation between adjacent envelope points; an accuracy at or
    below the cheapest envelope point costs that point's MACs.
    """
    envelope = pareto_envelope(points)
    for i, (acc, macs) in enumerate(envelope):
        if acc >= accuracy:
            if i == 0:
                return macs
            prev_acc, prev_macs = envelope[i - 1]
            share = (accuracy - prev_acc) / (acc - prev_acc)
            return prev_macs + share * (macs - prev_macs)
    return None


def macs_saved(curve: Points, reference_curve: Points, accuracy: float) -> float | None:
    """Share of the reference's MACs that ``curve`` saves at ``accuracy``: 1 - macs / reference.

    None where either curve never reaches ``accuracy``; negative where ``curve`` costs more.
    """
    macs = macs_at_accuracy(curve, accuracy)
    reference = macs_at_accuracy(reference_curve, accuracy)
    if macs is None or reference is None:
        return None
    if reference <= 0:
        raise ValueError(f"the reference curve reaches {accuracy} at {reference} MACs; need > 0")
    return 1.0 - macs / reference


def _accuracy_at_macs(envelope: list[Point], macs: float, interpolation: str) -> float:
    """The envelope's accuracy for a budget of ``macs`` (flat after its last point)."""
    best = envelope[0][0]
    for i, (acc, point_macs) in enumerate(envelope):
        if point_macs <= macs:
            best = acc
        else:
            if interpolation == "linear" and i > 0:
                prev_acc, prev_macs = envelope[i - 1]
                share = (macs - prev_macs) / (point_macs - prev_macs)
                best = prev_acc + share * (acc - prev_acc)
            break
    return best


def normalised_area(
    points: Points,
    cheapest: Sequence[float],
    oracle: Sequence[float],
    max_macs: float,
    interpolation: Literal["linear", "step"] = "linear",
) -> float:
    """Area under the accuracy-vs-MACs envelope, 0 for the cheapest classifier, 1 for the oracle.

    With ``cheapest = (a_0, m_0)`` (the first classifier alone, always
    available: every sample stops at stage 0), ``oracle = (a_*, m_*)`` and
    ``M = max_macs`` (e.g. the most expensive classifier's MACs), let f(m) be
    the accuracy of the envelope of ``points`` plus the cheapest point at a
    budget of m MACs: the best point costing at most m (``"step"``) or the line
    between the adjacent envelope points around m (``"linear"``), flat after
    the last point. Then

        area = (integral of f(m) dm over [m_0, M] - a_0 (M - m_0)) / ((a_* - a_0) (M - m_0)),

    the mean over budgets m uniform in [m_0, M] of the accuracy gained over the
    cheapest classifier, as a share of the oracle's gain. The cheapest point
    extended flat scores 0, the oracle's accuracy extended flat over the whole
    range scores 1 (``m_*`` is not used: the oracle is the ceiling, not a curve).
    """
    if interpolation not in ("linear", "step"):
        raise ValueError(f"interpolation must be 'linear' or 'step', got {interpolation!r}")
    ((a0, m0),) = _as_points([cheapest])
    ((a_star, _),) = _as_points([oracle])
    if not max_macs > m0:
        raise ValueError(f"max_macs must exceed the cheapest MACs {m0}, got {max_macs}")
    if not a_star > a0:
        raise ValueError(f"the oracle accuracy {a_star} must exceed the cheapest {a0}")
    envelope = pareto_envelope([*_as_points(points), (a0, m0)])
    knots = sorted({m0, max_macs, *(m for _, m in envelope if m0 < m < max_macs)})
    area = 0.0
    for left, right in zip(knots, knots[1:], strict=False):
        if interpolation == "step":  # f is constant on [left, right)
            area += _accuracy_at_macs(envelope, left, "step") * (right - left)
        else:  # f is linear on [left, right]: the trapezoid is exact
            f_left = _accuracy_at_macs(envelope, left, "linear")
            f_right = _accuracy_at_macs(envelope, right, "linear")
            area += (f_left + f_right) / 2 * (right - left)
    width = max_macs - m0
    return (area - a0 * width) / ((a_star - a0) * width)


class MeanStd(NamedTuple):
    """Mean and sample standard deviation (n - 1) of the values present, and their count."""

    mean: float
    std: float
    n: int


def mean_std(values: Iterable[float | None]) -> MeanStd:
    """Mean, sample std and count of ``values``, ignoring None (NaN mean / std when too few)."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if n == 0:
        return MeanStd(float("nan"), float("nan"), 0)
    mean = sum(present) / n
    if n == 1:
        return MeanStd(mean, float("nan"), 1)
    return MeanStd(mean, math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)), n)
