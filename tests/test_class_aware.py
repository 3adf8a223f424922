"""Class-aware thresholds: the shared rule as a special case, the specialist fit, shrinkage."""

import math

import pytest
import torch

from conftest import random_outputs
from policycascade.agents.class_aware import ClassAwareSearch, ClassAwareThresholdRule
from policycascade.agents.rules import StoppingRule, stop_decisions
from policycascade.agents.thresholds import CRITERIA, ThresholdRule, ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule


def _random_thresholds(g: torch.Generator, stages: int, classes: int) -> list[list[float]]:
    table = torch.rand(stages, classes, generator=g).tolist()
    table[0][0] = float("inf")
    table[-1][-1] = float("-inf")
    return table


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scaled", [False, True])
def test_equal_class_thresholds_decide_exactly_as_the_shared_rule(criterion, scaled):
    g = torch.Generator().manual_seed(1)
    for case in range(20):
        k, c = 2 + case % 3, 2 + case % 5
        outputs = random_outputs(64, k, c, seed=case)
        thresholds = (torch.rand(k - 1, generator=g) * 2 - 0.5).tolist()
        thresholds[case % (k - 1)] = [float("inf"), float("-inf")][case % 2]
        temps = (torch.rand(k, generator=g) + 0.5).tolist() if scaled else None
        shared = ThresholdRule(criterion, thresholds, temps)
        rule = ClassAwareThresholdRule.from_shared(shared, c)
        assert torch.equal(rule.stop_scores(outputs.probs), shared.stop_scores(outputs.probs))
        assert torch.equal(
            stop_decisions(rule, outputs.probs), stop_decisions(shared, outputs.probs)
        )


def test_the_rule_is_a_stopping_rule_that_reads_only_the_visited_prefix():
    g = torch.Generator().manual_seed(2)
    for case in range(20):
        k, c = 2 + case % 3, 3
        probs = random_outputs(32, k, c, seed=case).probs
        rule = ClassAwareThresholdRule(CRITERIA[case % 4], _random_thresholds(g, k - 1, c))
        if case % 2:
            rule = rule.with_offsets((torch.rand(k - 1, generator=g) - 0.5).tolist())
        assert isinstance(rule, StoppingRule)
        full = rule.stop_scores(probs)
        assert full.shape == (32, k - 1) and full.dtype == torch.float64
        for s in range(1, k + 1):
            assert torch.equal(rule.stop_scores(probs[:, :s]), full[:, : min(s, k - 1)])


def test_a_stage_stops_on_its_predicted_class_threshold_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.1, 0.6, 0.3], [0.1, 0.8, 0.1]]])
    rule = ClassAwareThresholdRule("max-softmax", [[0.8, 0.5, 0.0]])
    assert rule.stop_scores(probs).squeeze(1).tolist() == pytest.approx([0.7 - 0.8, 0.6 - 0.5])
    assert stop_decisions(rule, probs).tolist() == [[False, True], [True, True]]


def _specialist_outputs(per_class: int = 200) -> CascadeOutputs:
    """Stage 0 answers true classes 1 and 2 right, and true 0 and its twin 3 both as 0.

    Its confidences are the same on every group, so only the predicted class tells
    when to trust it; the last stage is always right.
    """
    conf = torch.linspace(0.5, 0.95, per_class)
    rows, labels = [], []
    for label, predicted in [(0, 0), (1, 1), (2, 2), (3, 0)]:
        first = ((1 - conf) / 3).unsqueeze(1).repeat(1, 4)
        first[:, predicted] = conf
        last = torch.full((per_class, 4), 0.01)
        last[:, label] = 0.97
        rows.append(torch.stack([first, last], dim=1))
        labels += [label] * per_class
    costs = StageCosts([10, 100])
    return CascadeOutputs(torch.cat(rows), torch.tensor(labels), costs)


def _reward(outputs: CascadeOutputs, rule, alpha: float) -> float:
    result = evaluate_rule(rule, outputs)
    return result["accuracy"] - alpha * result["macs_share"]


def test_fit_never_stops_on_the_confidently_wrong_class_and_beats_the_shared_rule():
    outputs, alpha = _specialist_outputs(), 0.1
    search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs)
    rule = search.for_reward(alpha)
    shared = ThresholdSearch(outputs.probs, outputs.labels, outputs.costs).for_reward(alpha)
    assert rule.thresholds[0][0] == math.inf  # half of stage 0's answers 0 are wrong
    assert rule.thresholds[0][1] <= 0.5 and rule.thresholds[0][2] <= 0.5  # always right: stop
    assert shared.thresholds == [math.inf]  # one threshold cannot tell the groups apart
    assert _reward(outputs, rule, alpha) > _reward(outputs, shared, alpha) + 0.04
    # class 1 and 2 stop at stage 0 (10 MACs), the rest pays 110: all right
    result = evaluate_rule(rule, outputs)
    assert result["accuracy"] == 1.0
    assert result["mean_macs"] == pytest.approx((400 * 10 + 400 * 110) / 800)


def _one_rare_sample_outputs() -> tuple[CascadeOutputs, float]:
    """1000 samples of classes 0/1 right at stage 0 exactly when its confidence >= 0.7,
    plus one sample predicted 2 at stage 0, confidently (0.99) wrong there."""
    n = 1000
    conf = torch.linspace(0.5, 0.98, n)
    labels = torch.arange(n) % 2
    predicted = torch.where(conf >= 0.7, labels, 1 - labels)
    first = ((1 - conf) / 2).unsqueeze(1).repeat(1, 3)
    first[torch.arange(n), predicted] = conf
    first = torch.cat([first, torch.tensor([[0.005, 0.005, 0.99]])])
    labels = torch.cat([labels, torch.tensor([0])])
    last = torch.full((n + 1, 3), 0.01)
    last[torch.arange(n + 1), labels] = 0.98
    probs = torch.stack([first, last], dim=1)
    return CascadeOutputs(probs, labels, StageCosts([10, 100])), 0.99


def test_a_class_with_one_sample_stays_at_the_shared_threshold():
    outputs, rare_conf = _one_rare_sample_outputs()
    alpha = 0.1
    shrunk = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, prior_samples=50)
    rule = shrunk.for_reward(alpha)
    shared = rule.shared_thresholds[0]
    assert 0.69 <= shared <= 0.71
    assert rule.thresholds[0][2] == pytest.approx(shared, abs=1e-9)
    # without the prior the one wrong sample pushes its class above its confidence
    alone = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, prior_samples=0)
    assert alone.for_reward(alpha).thresholds[0][2] > rare_conf
    # and an infinite prior is the shared rule itself
    pooled = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, prior_samples=math.inf)
    assert pooled.for_reward(alpha).thresholds[0] == [shared] * 3


def test_target_fits_meet_their_target_on_validation_and_never_cost_more_than_shared():
    for case in range(3):
        outputs = random_outputs(200, 3, 4, seed=10 + case)
        search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, alphas=(1e-3, 0.1))
        shared = ThresholdSearch(outputs.probs, outputs.labels, outputs.costs)
        free = outputs.with_costs(outputs.costs.with_policy_macs([0, 0, 0]))
        target = search.last_accuracy - 0.01
        rule = search.for_accuracy(target)
        result = evaluate_rule(rule, free)
        assert (result["accuracy"], result["mean_macs"]) == pytest.approx(search.evaluate(rule))
        assert result["accuracy"] >= target - 1e-12
        assert result["mean_macs"] <= evaluate_rule(shared.for_accuracy(target), free)["mean_macs"]
        budget = 0.5 * search.reference_macs
        within = evaluate_rule(search.for_budget(budget), free)
        assert within["mean_macs"] <= budget + 1e-9
        assert within["accuracy"] >= evaluate_rule(shared.for_budget(budget), free)["accuracy"]
        curve = search.sweep(4)
        assert len(curve) == 4 and all(isinstance(r, ClassAwareThresholdRule) for r in curve)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ClassAwareThresholdRule("ensemble", [[0.5]]), "criterion"),
        (lambda: ClassAwareThresholdRule("max-softmax", [[0.5, 0.5], [0.5]]), "thresholds"),
        (lambda: ClassAwareThresholdRule("max-softmax", [[float("nan")]]), "thresholds"),
        (lambda: ClassAwareThresholdRule("max-softmax", []), "thresholds"),
        (lambda: ClassAwareThresholdRule("max-softmax", [[0.5]], [1.0]), "temperatures"),
        (lambda: ClassAwareThresholdRule("max-softmax", [[0.5]], [1.0, -1.0]), "temperatures"),
        (
            lambda: ClassAwareThresholdRule("max-softmax", [[0.5, 0.5]]).stop_scores(
                torch.ones(2, 2, 3) / 3
            ),
            "history",
        ),
        (
            lambda: ClassAwareThresholdRule.from_shared(ThresholdRule("entropy", [0.1]), 0),
            "num_classes",
        ),
    ],
)
def test_rule_argument_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    ("kwargs", "call", "name"),
    [
        ({"prior_samples": -1}, None, "prior_samples"),
        ({"alphas": ()}, None, "alphas"),
        ({"alphas": (float("nan"),)}, None, "alphas"),
        ({"passes": 0}, None, "passes"),
        ({"criterion": "nope"}, None, "criterion"),
        ({}, lambda s: s.for_reward(-1.0), "alpha"),
        ({}, lambda s: s.for_accuracy_drop(-0.1), "epsilon"),
        ({}, lambda s: s.for_accuracy(float("nan")), "target"),
        ({}, lambda s: s.for_budget(0), "macs_budget"),
        ({}, lambda s: s.sweep(1), "points"),
    ],
)
def test_search_argument_errors_name_the_argument(kwargs, call, name):
    outputs = random_outputs(40, 3, 3)
    with pytest.raises(ValueError, match=name):
        search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, **kwargs)
        call(search)


def test_search_input_errors_name_the_argument():
    outputs = random_outputs(40, 3, 3)
    with pytest.raises(ValueError, match="probs"):
        ClassAwareSearch(outputs.probs[:, 0], outputs.labels, outputs.costs)
    with pytest.raises(ValueError, match="labels"):
        ClassAwareSearch(outputs.probs, outputs.labels[:5], outputs.costs)
    with pytest.raises(ValueError, match="costs"):
        ClassAwareSearch(outputs.probs, outputs.labels, StageCosts([1, 2]))
