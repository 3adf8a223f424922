"""Valid p-values for "the mean of a bounded loss exceeds a target", one row of losses per rule.

Every function tests H0: E[loss] > target (or >=) on n iid losses and returns, per row, a
p-value p with P(p <= u) <= u under H0 for every u: rejecting at p <= delta certifies
E[loss] <= target with probability >= 1 - delta. Losses come as a (rules, samples) float64
array already mapped to [0, 1] (see :func:`to_unit`), except :func:`discordant_p_values`,
which reads the paired loss in {-1, 0, 1} directly.

- ``hoeffding-bentkus``: Bates et al. 2021 (RCPS) / Angelopoulos et al. 2021 (LtT, eq. 8).
- ``bernstein``: empirical Bernstein, Maurer & Pontil 2009, Theorem 4, inverted in delta.
- ``betting``: Waudby-Smith & Ramdas 2023, one-sided capital with predictable plug-in bets
  (their eq. 26), p = 1 / max capital by Ville's inequality.
- ``exact``: binomial test for 0/1 losses; for the paired loss, an exact test on the
  discordant pairs (McNemar) with a Berger-Boos bound on the discordance rate for eps > 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom

BOUNDS = ("hoeffding-bentkus", "bernstein", "betting", "exact")
BET_CAP = 0.75  # bets stay <= 3/4 of the largest safe bet (Waudby-Smith & Ramdas use 1/2 or 3/4)
NUISANCE_SHARE = 0.2  # share of delta spent bounding the discordance rate (Berger & Boos 1994)


def to_unit(losses: np.ndarray, target: float, low: float, high: float) -> tuple[np.ndarray, float]:
    """Losses in [low, high] and their target, mapped affinely to [0, 1]."""
    span = high - low
    return (np.asarray(losses, dtype=np.float64) - low) / span, (target - low) / span


def _rows(losses: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    return losses[None] if losses.ndim == 1 else losses


def hoeffding_bentkus_p_values(losses: np.ndarray, target: float) -> np.ndarray:
    """min(Hoeffding, Bentkus) p-values for losses in [0, 1] (LtT eq. 8)."""
    x = _rows(losses)
    n = x.shape[1]
    mean = x.mean(1)
    a = np.minimum(mean, target)
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = np.where(a > 0, a * np.log(a / target), 0.0) + np.where(
            a < 1, (1 - a) * np.log((1 - a) / (1 - target)), 0.0
        )
    hoeffding = np.exp(-n * h1)
    bentkus = math.e * binom.cdf(np.ceil(n * mean - 1e-9), n, target)
    return np.minimum(1.0, np.minimum(hoeffding, bentkus))


def bernstein_p_values(losses: np.ndarray, target: float) -> np.ndarray:
    """Maurer & Pontil (2009) Thm 4 for losses in [0, 1], solved for the smallest delta.

    mean + sqrt(2 V log(2/d) / n) + 7 log(2/d) / (3 (n - 1)) <= target is a quadratic in
    s = sqrt(log(2/d)); the p-value is 2 exp(-s*^2) at its positive root s*.
    """
    x = _rows(losses)
    n = x.shape[1]
    gap = target - x.mean(1)
    a = 7.0 / (3.0 * (n - 1))
    b = np.sqrt(2.0 * x.var(1, ddof=1) / n)
    root = (-b + np.sqrt(b * b + 4 * a * np.maximum(gap, 0.0))) / (2 * a)
    return np.where(gap > 0, np.minimum(1.0, 2.0 * np.exp(-(root**2))), 1.0)


def betting_p_values(losses: np.ndarray, target: float, delta: float) -> np.ndarray:
    """Waudby-Smith & Ramdas betting p-values for losses in [0, 1] (order as given).

    Capital K_t = prod_{i<=t} (1 - lambda_i (x_i - target)) is a nonnegative supermartingale
    under H0 (mean >= target) for predictable bets 0 <= lambda_i < 1 / (1 - target), so
    p = 1 / max_t K_t is valid by Ville's inequality. Bets follow the predictable plug-in
    lambda_i = sqrt(2 log(1/delta) / (n sigma_{i-1}^2)), capped at BET_CAP / (1 - target).
    """
    x = _rows(losses)
    n = x.shape[1]
    t = np.arange(1, n + 1, dtype=np.float64)
    mu = (0.5 + np.cumsum(x, 1)) / (t + 1)
    sigma2 = (0.25 + np.cumsum((x - mu) ** 2, 1)) / (t + 1)
    sigma2 = np.concatenate([np.full((len(x), 1), 0.25), sigma2[:, :-1]], axis=1)
    bets = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * sigma2)), BET_CAP / (1 - target))
    log_capital = np.cumsum(np.log1p(-bets * (x - target)), 1)
    return np.minimum(1.0, np.exp(-np.maximum(log_capital.max(1), 0.0)))


def binomial_p_values(losses: np.ndarray, target: float) -> np.ndarray:
    """Exact binomial test for 0/1 losses: P(Bin(n, target) <= observed count)."""
    x = _rows(losses)
    return binom.cdf(np.rint(x.sum(1)), x.shape[1], target)


def discordant_p_values(paired: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """Exact test of E[l] > epsilon for paired losses l in {-1, 0, 1} (drop vs a reference).

    Given D discordant pairs, the count of l = +1 is Bin(D, q) with drop = pi (2q - 1), pi the
    discordance rate. For epsilon = 0 this is McNemar's exact test (q > 1/2 under H0). For
    epsilon > 0, gamma = NUISANCE_SHARE * delta buys a Clopper-Pearson upper bound pi_U on
    pi; under H0 and pi <= pi_U, q > q0 = (1 + epsilon / pi_U) / 2, and
    p = gamma + P(Bin(D, q0) <= n_plus) is valid (Berger & Boos 1994).
    """
    x = _rows(paired)
    n = x.shape[1]
    plus = (x > 0.5).sum(1)
    discordant = plus + (x < -0.5).sum(1)
    if epsilon == 0:
        return binom.cdf(plus, discordant, 0.5)
    gamma = NUISANCE_SHARE * delta
    pi_upper = np.where(
        discordant < n, beta_dist.ppf(1 - gamma, discordant + 1, n - discordant), 1.0
    )
    q0 = (1 + epsilon / pi_upper) / 2
    conditional = np.where(q0 < 1, binom.cdf(plus, discordant, np.minimum(q0, 1.0)), 0.0)
    return np.minimum(1.0, gamma + conditional)


def p_values(
    bound: str, losses: np.ndarray, target: float, low: float, high: float, delta: float
) -> np.ndarray:
    """P-values of H0: E[loss] > target for each row of losses in [low, high].

    ``exact`` needs losses on {low, high} (binomial) or the paired loss on {-1, 0, 1}.
    """
    if bound == "exact" and (low, high) == (-1.0, 1.0):
        return discordant_p_values(losses, target, delta)
    unit, unit_target = to_unit(losses, target, low, high)
    if unit_target >= 1:
        return np.zeros(len(_rows(unit)))
    if unit_target <= 0:
        return np.ones(len(_rows(unit)))
    if bound == "hoeffding-bentkus":
        return hoeffding_bentkus_p_values(unit, unit_target)
    if bound == "bernstein":
        return bernstein_p_values(unit, unit_target)
    if bound == "betting":
        return betting_p_values(unit, unit_target, delta)
    if bound == "exact":
        if not np.all((unit == 0) | (unit == 1)):
            raise ValueError("bound='exact' needs 0/1 or paired {-1, 0, 1} losses")
        return binomial_p_values(unit, unit_target)
    raise ValueError(f"bound must be one of {list(BOUNDS)}, got {bound!r}")
