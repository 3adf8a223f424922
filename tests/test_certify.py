import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from policycascade.agents.rules import LargestOnlyRule
from policycascade.agents.thresholds import ThresholdRule, ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.certify import Family, Target, certified_fit, fixed_sequence
from policycascade.certify_bounds import (
    bernstein_p_values,
    betting_p_values,
    binomial_p_values,
    discordant_p_values,
    hoeffding_bentkus_p_values,
    p_values,
)
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule


def _thresholds(rule) -> list[float]:
    """A max-softmax rule's thresholds; the largest classifier alone answers as +inf ones."""
    if isinstance(rule, LargestOnlyRule):
        return [math.inf] * (rule.num_stages - 1)
    return list(rule.thresholds)


def _rejection_rate_is_at_most(rejections: int, draws: int, delta: float) -> bool:
    """Rejection rate consistent with <= delta: the one-sided 99.9% lower CP bound is <= delta."""
    if rejections == 0:
        return True
    return float(beta_dist.ppf(0.001, rejections, draws - rejections + 1)) <= delta


# --- bounds against exact binomial cases ------------------------------------------------


@pytest.mark.parametrize("n", [20, 137])
def test_binomial_p_value_is_dual_to_clopper_pearson(n):
    delta = 0.1
    for k in range(n + 1):
        losses = np.r_[np.ones(k), np.zeros(n - k)]
        upper = 1.0 if k == n else beta_dist.ppf(1 - delta, k + 1, n - k)
        for target in (0.05, 0.2, 0.5, 0.9):
            if abs(target - upper) < 1e-9:
                continue
            rejected = binomial_p_values(losses, target)[0] <= delta
            assert rejected == (target > upper), (k, target)


def test_hoeffding_bentkus_is_never_below_the_exact_binomial_p_value():
    n, target = 60, 0.3
    for k in range(n + 1):
        losses = np.r_[np.ones(k), np.zeros(n - k)]
        exact = binom.cdf(k, n, target)
        assert hoeffding_bentkus_p_values(losses, target)[0] >= exact - 1e-12


def test_hoeffding_bentkus_matches_mapie_where_installed():
    methods = pytest.importorskip("mapie.risk_control.methods")
    x = np.random.default_rng(0).uniform(0, 1, (50, 200)) ** 3
    for target in (0.1, 0.2, 0.4):
        theirs = methods.compute_hoeffding_bentkus_p_value(x.mean(1), 200, target)[:, 0]
        np.testing.assert_allclose(hoeffding_bentkus_p_values(x, target), np.minimum(theirs, 1))


def test_bernstein_p_value_inverts_maurer_pontil():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.4, size=200)
    target = 0.35
    p = bernstein_p_values(x, target)[0]
    assert 0 < p < 1
    log_term = math.log(2 / p)
    ucb = x.mean() + math.sqrt(2 * x.var(ddof=1) * log_term / 200) + 7 * log_term / (3 * 199)
    assert ucb == pytest.approx(target, abs=1e-9)
    assert bernstein_p_values(x, x.mean() - 1e-3)[0] == 1.0


def test_betting_capital_matches_a_hand_computation():
    # n = 2, losses 0 then 1, target 1/2: sigma_0^2 = 1/4; after x=0, mu_1 = 1/4,
    # sigma_1^2 = (1/4 + 1/16) / 2 = 5/32; bets sqrt(2 log(1/d) / (2 sigma^2)) capped at 3/2
    delta = 0.1
    lam1 = min(math.sqrt(2 * math.log(1 / delta) / (2 * 0.25)), 1.5)
    lam2 = min(math.sqrt(2 * math.log(1 / delta) / (2 * 5 / 32)), 1.5)
    capital = [1 + lam1 * 0.5, (1 + lam1 * 0.5) * (1 - lam2 * 0.5)]
    p = betting_p_values(np.array([0.0, 1.0]), 0.5, delta)[0]
    assert p == pytest.approx(1 / max(capital))


@pytest.mark.parametrize("bound", ["hoeffding-bentkus", "bernstein", "betting", "exact"])
@pytest.mark.parametrize("target", [0.05, 0.3])
def test_bernoulli_type_one_error_at_the_boundary_is_at_most_delta(bound, target):
    rng = np.random.default_rng(1)
    draws, n, delta = 4000, 80, 0.1
    losses = (rng.random((draws, n)) < target).astype(np.float64)
    p = p_values(bound, losses, target, 0.0, 1.0, delta)
    assert _rejection_rate_is_at_most(int((p <= delta).sum()), draws, delta)


@pytest.mark.parametrize("bound", ["hoeffding-bentkus", "bernstein", "betting", "exact"])
@pytest.mark.parametrize(
    ("epsilon", "p_minus"), [(0.0, 0.05), (0.02, 0.0), (0.02, 0.01), (0.05, 0.1)]
)
def test_paired_loss_type_one_error_at_the_boundary_is_at_most_delta(bound, epsilon, p_minus):
    rng = np.random.default_rng(2)
    draws, n, delta = 4000, 300, 0.1
    p_plus = p_minus + epsilon  # drop = p_plus - p_minus = epsilon: the boundary of H0
    u = rng.random((draws, n))
    losses = np.where(u < p_plus, 1.0, np.where(u < p_plus + p_minus, -1.0, 0.0))
    p = p_values(bound, losses, epsilon, -1.0, 1.0, delta)
    assert _rejection_rate_is_at_most(int((p <= delta).sum()), draws, delta)


def test_discordant_test_is_mcnemar_at_zero_and_rejects_clear_cases():
    losses = np.r_[np.ones(3), -np.ones(12), np.zeros(985)]
    assert discordant_p_values(losses, 0.0, 0.1)[0] == pytest.approx(binom.cdf(3, 15, 0.5))
    # 15 discordant pairs in 1000: the discordance rate itself is below 0.03
    assert discordant_p_values(losses, 0.03, 0.1)[0] <= 0.1
    assert discordant_p_values(np.r_[np.ones(40), np.zeros(960)], 0.03, 0.1)[0] > 0.1


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert fixed_sequence(np.array([0.0, 0.01, 0.2, 0.01]), 0.05) == 1
    assert fixed_sequence(np.array([0.0, 0.01]), 0.05) == 1
    assert fixed_sequence(np.array([0.3, 0.0]), 0.05) == -1


# --- certified fits on a population whose truth is known ---------------------------------


def _population(n: int, seed: int) -> CascadeOutputs:
    """3 stages, 2 classes; each stage is right with probability equal to its confidence."""
    g = torch.Generator().manual_seed(seed)
    skill = torch.tensor([0.0, 1.0, 3.0])  # later stages are surer
    conf = 0.5 + 0.5 * torch.rand(n, 3, generator=g) ** (1 / (1 + skill))
    correct = torch.rand(n, 3, generator=g) < conf
    labels = torch.randint(0, 2, (n,), generator=g)
    top = torch.where(correct, labels.unsqueeze(1), 1 - labels.unsqueeze(1))
    probs = torch.stack([1 - conf, conf], -1)  # class 1 gets conf ...
    probs = torch.where((top == 1).unsqueeze(-1), probs, probs.flip(-1))  # ... or class 0
    return CascadeOutputs(probs, labels, StageCosts([10, 100, 1000]))


def _draw(population: CascadeOutputs, n: int, g: torch.Generator) -> CascadeOutputs:
    index = torch.randint(0, population.num_samples, (n,), generator=g)
    return CascadeOutputs(population.probs[index], population.labels[index], population.costs)


def _true_drop(rule, population: CascadeOutputs) -> float:
    result = evaluate_rule(rule, population)
    return result["stage_accuracy"][-1] - result["accuracy"]


@pytest.mark.parametrize(
    ("path", "bound", "draws"),
    [("fixed", "auto", 200), ("split", "exact", 30), ("both", "exact", 30)],
)
def test_certified_rule_violates_its_target_at_most_delta_of_the_time(path, bound, draws):
    population = _population(20_000, seed=0)  # the truth: samples are drawn from it iid
    truth = Family.of("max-softmax", population.probs, population.labels, population.costs)
    target = Target.accuracy_drop(0.05)
    g = torch.Generator().manual_seed(1)
    delta, n = 0.2, 600
    violated, plain_violated, certified = 0, 0, 0
    for i in range(draws):
        calibration = _draw(population, n, g)
        fit = certified_fit(calibration, target, delta, path=path, bound=bound, seed=i)
        rules = [_thresholds(fit.rule)]
        if path == "split":  # the plain fit on the same samples, for contrast
            search = ThresholdSearch(calibration.probs, calibration.labels, calibration.costs)
            rules.append(search.for_accuracy_drop(target.value).thresholds)
        losses, _, _ = truth.losses(target, truth.exits(torch.tensor(rules)))
        drops = losses.mean(1)
        violated += drops[0] > target.value
        plain_violated += len(drops) > 1 and drops[1] > target.value
        certified += fit.certified
    assert certified > draws // 4  # the test has something to check
    assert _rejection_rate_is_at_most(violated, draws, delta)
    if path == "split":
        assert plain_violated > delta * draws  # the plain fit breaks its promise


@pytest.mark.parametrize("target", [Target.budget(0.3), Target.accuracy(0.84)])
def test_certified_budget_and_accuracy_hold_at_least_one_minus_delta_of_the_time(target):
    population = _population(20_000, seed=6)
    truth = Family.of("max-softmax", population.probs, population.labels, population.costs)
    g = torch.Generator().manual_seed(2)
    delta, draws = 0.2, 150
    violated, certified = 0, 0
    for i in range(draws):
        fit = certified_fit(_draw(population, 300, g), target, delta, path="fixed", seed=i)
        losses, _, _ = truth.losses(target, truth.exits(torch.tensor([_thresholds(fit.rule)])))
        violated += losses.mean() > truth.risk_target(target) + 1e-12
        certified += fit.certified
    assert certified > draws // 4
    assert _rejection_rate_is_at_most(violated, draws, delta)


def test_uncertifiable_target_falls_back_to_the_largest_classifier_and_says_so():
    population = _population(5_000, seed=3)
    small = _draw(population, 30, torch.Generator().manual_seed(0))
    fit = certified_fit(small, Target.accuracy_drop(0.01), 0.05)
    assert not fit.certified
    assert isinstance(fit.rule, LargestOnlyRule) and fit.rule.num_stages == 3
    assert fit.needed_samples is None or fit.needed_samples > 30
    assert "fell back" in fit.message
    described = fit.describe()
    assert described["certified"] is False and described["num_samples"] == fit.num_samples


def test_budget_target_counts_unlabelled_samples():
    population = _population(20_000, seed=4)
    g = torch.Generator().manual_seed(0)
    labelled = _draw(population, 400, g)
    extra = _draw(population, 3000, g).probs
    share = 0.5
    alone = certified_fit(labelled, Target.budget(share), 0.1, path="fixed")
    more = certified_fit(labelled, Target.budget(share), 0.1, path="fixed", unlabelled_probs=extra)
    assert more.num_samples == alone.num_samples + 3000
    assert more.certified
    assert evaluate_rule(more.rule, population)["macs_share"] <= share


def test_accuracy_target_is_certified_where_the_largest_classifier_clears_it():
    population = _population(20_000, seed=5)
    calibration = _draw(population, 2000, torch.Generator().manual_seed(0))
    fit = certified_fit(calibration, Target.accuracy(0.8), 0.1, path="fixed")
    assert fit.certified and isinstance(fit.rule, ThresholdRule)
    assert evaluate_rule(fit.rule, population)["accuracy"] >= 0.8


# --- argument errors ------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [-0.01, 1.0, float("nan")])
def test_epsilon_outside_zero_one_is_refused(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        Target.accuracy_drop(epsilon)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5, 2])
def test_delta_outside_zero_one_is_refused(delta):
    outputs = _population(50, seed=0)
    with pytest.raises(ValueError, match="delta"):
        certified_fit(outputs, Target.accuracy_drop(0.01), delta)


def test_other_bad_arguments_name_themselves():
    outputs = _population(50, seed=0)
    target = Target.accuracy_drop(0.01)
    one = CascadeOutputs(outputs.probs[:1], outputs.labels[:1], outputs.costs)
    with pytest.raises(ValueError, match="calibration"):
        certified_fit(one, target, 0.1)
    with pytest.raises(ValueError, match="bound"):
        certified_fit(outputs, target, 0.1, bound="chebyshev")
    with pytest.raises(ValueError, match="path_share"):
        certified_fit(outputs, target, 0.1, path_share=1.0)
    with pytest.raises(ValueError, match="family"):
        certified_fit(outputs, target, 0.1, family="vibes")
    with pytest.raises(ValueError, match="unlabelled_probs"):
        certified_fit(outputs, Target.budget(0.5), 0.1, unlabelled_probs=torch.rand(5, 2, 2))
    with pytest.raises(ValueError, match="unlabelled_probs"):
        certified_fit(outputs, target, 0.1, unlabelled_probs=outputs.probs)
    with pytest.raises(ValueError, match="budget"):
        Target.budget(0.0)
