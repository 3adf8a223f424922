"""Continuation-value stopping (Longstaff & Schwartz) and the stop features it reads."""

import pytest
import torch

from policycascade.agents.continuation import (
    ContinuationValueRule,
    fit_continuation_rule,
    stage_answers,
)
from policycascade.agents.stop_features import (
    FEATURE_SETS,
    ensemble_confidence,
    ensemble_probs,
    stop_features,
)
from policycascade.costs import count_macs

CUMULATIVE_COSTS = torch.tensor([0.1, 0.4, 1.4])  # classifier costs 0.1, 0.3, 1.0


def difficulty_cascade(n: int, seed: int, num_classes: int = 4):
    """K=3 cascade where every stage's correctness is a step function of its max-softmax.

    Each sample's group g is the first stage that is right (g=2: only the last). A
    stage that is right is confident (max-softmax in [0.8, 0.95]); a wrong stage 0
    says how wrong: [0.5, 0.65] when stage 1 will be right, [0.3, 0.4] when it will
    not; a wrong stage 1 has [0.3, 0.4]. So stage 0's confidence alone tells which
    exit is best, and the optimal exit per sample is the argmax of the stage returns.
    """
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(3, (n,), generator=g)
    labels = torch.randint(num_classes, (n,), generator=g)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    stages = []
    for t in range(3):
        right = group <= t
        top = torch.where(right, uniform(0.8, 0.95), uniform(0.3, 0.4))
        if t == 0:
            top = torch.where(group == 1, uniform(0.5, 0.65), top)
        answer = torch.where(right, labels, (labels + 1) % num_classes)
        probs = ((1 - top) / (num_classes - 1)).unsqueeze(1).repeat(1, num_classes)
        probs[torch.arange(n), answer] = top
        stages.append(probs)
    return torch.stack(stages, dim=1), labels


def stage_rewards(probs, labels, alpha, answer="exit"):
    right = (stage_answers(probs, answer) == labels.unsqueeze(1)).double()
    return right - alpha * CUMULATIVE_COSTS.double().unsqueeze(0)  # (N, K)


@pytest.mark.parametrize("feature_set", ["max-softmax", "confidence", "history"])
@pytest.mark.parametrize("alpha", [0.05, 1.1])
def test_recovers_the_optimal_policy_on_a_hand_built_cascade(feature_set, alpha):
    # alpha=0.05: exit at the first right stage. alpha=1.1: a sample that only the last
    # stage gets right is best answered (wrongly) at stage 0, so the optimal stage-0 rule
    # stops at high *and* low confidence: no threshold can express it.
    fit_probs, fit_labels = difficulty_cascade(2000, seed=0)
    probs, labels = difficulty_cascade(5000, seed=1)
    rule = fit_continuation_rule(fit_probs, fit_labels, CUMULATIVE_COSTS, alpha, feature_set)
    rewards = stage_rewards(probs, labels, alpha)
    optimal_exit = rewards.argmax(1)
    exit_stage = rule.exits(probs)
    assert (exit_stage == optimal_exit).double().mean() >= 0.99
    reward = rewards.gather(1, exit_stage.unsqueeze(1)).mean()
    assert float(rewards.max(1).values.mean() - reward) <= 1e-3
    if alpha == 1.1:
        assert set(optimal_exit.tolist()) == {0, 1}


@pytest.mark.parametrize("feature_set", FEATURE_SETS)
def test_stage_score_ignores_later_stages(feature_set):
    probs, labels = difficulty_cascade(500, seed=2)
    rule = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.05, feature_set, hidden=4)
    scores = rule.stop_scores(probs)
    for t in range(2):
        changed = probs.clone()
        changed[:, t + 1 :] = torch.randn(changed[:, t + 1 :].shape).softmax(-1)
        assert torch.equal(rule.stop_scores(changed)[:, : t + 1], scores[:, : t + 1])


@pytest.mark.parametrize("answer", ["exit", "ensemble"])
def test_scores_on_all_stages_equal_scores_on_history_prefixes(answer):
    probs, labels = difficulty_cascade(500, seed=3)
    rule = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.05, "history", answer)
    full = rule.stop_scores(probs)
    assert full.shape == (500, 2)
    for s in (1, 2):
        prefix = rule.stop_scores(probs[:, :s])
        assert prefix.shape == (500, s)
        torch.testing.assert_close(prefix, full[:, :s], rtol=0, atol=1e-6)


def test_huge_alpha_stops_at_stage_zero_everywhere():
    probs, labels = difficulty_cascade(1000, seed=4)
    rule = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 1e3, "history")
    assert torch.all(rule.exits(probs) == 0)


def test_free_computation_and_a_perfect_last_stage_never_stop_on_a_wrong_answer():
    fit_probs, fit_labels = difficulty_cascade(2000, seed=5)
    probs, labels = difficulty_cascade(2000, seed=6)
    rule = fit_continuation_rule(fit_probs, fit_labels, CUMULATIVE_COSTS, 0.0, "confidence")
    exit_stage = rule.exits(probs)
    assert torch.equal(rule.predictions(probs, exit_stage), labels)


def test_predictions_answer_with_exit_classifier_or_running_ensemble():
    probs = torch.tensor([[[0.6, 0.4], [0.0, 1.0], [0.9, 0.1]]] * 2)  # stage answers 0, 1, 0
    exit_stage = torch.tensor([1, 2])
    exit_rule = ContinuationValueRule(3, 2, CUMULATIVE_COSTS, 0.1, answer="exit")
    ensemble_rule = ContinuationValueRule(3, 2, CUMULATIVE_COSTS, 0.1, answer="ensemble")
    assert exit_rule.predictions(probs, exit_stage).tolist() == [1, 0]
    # ensemble of stages 0..1 = (0.3, 0.7); of 0..2 = (0.5, 0.5) -> ties go to class 0
    assert ensemble_rule.predictions(probs, exit_stage).tolist() == [1, 0]


def test_checkpoint_round_trip_gives_the_same_scores():
    probs, labels = difficulty_cascade(500, seed=7)
    rule = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.05, "class", hidden=8)
    restored = ContinuationValueRule.from_dict(rule.to_dict())
    assert torch.equal(restored.stop_scores(probs), rule.stop_scores(probs))
    assert restored.config() == rule.config()


def test_fit_is_deterministic_for_a_seed():
    probs, labels = difficulty_cascade(500, seed=8)
    a = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.05, hidden=4, seed=3)
    b = fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.05, hidden=4, seed=3)
    assert torch.equal(a.stop_scores(probs), b.stop_scores(probs))


def test_policy_macs_count_each_stage_model_and_zero_at_the_last_stage():
    rule = ContinuationValueRule(3, 4, CUMULATIVE_COSTS, 0.1, "confidence", hidden=0)
    assert rule.policy_macs() == [4 * (4 + 2), 4 * (4 + 1), 0]  # 4 features -> outcome + exits
    mlp = ContinuationValueRule(3, 4, CUMULATIVE_COSTS, 0.1, "confidence", hidden=8)
    assert mlp.policy_macs() == [4 * 8 + 8 * 6, 4 * 8 + 8 * 5, 0]
    for r in (rule, mlp):  # what torch's FLOP counter finds on the stage models
        counted = [count_macs(m, torch.zeros(1, m.mean.numel())) for m in r.stage_models]
        assert r.policy_macs() == [*counted, 0]


@pytest.mark.parametrize(
    ("feature_set", "widths"),
    [
        ("max-softmax", [1, 1, 1]),
        ("confidence", [4, 4, 4]),
        ("history", [6, 8, 10]),
        ("class", [11, 13, 15]),
    ],
)
def test_feature_shapes(feature_set, widths):
    probs = torch.randn(7, 3, 5).softmax(-1)
    for s, width in enumerate(widths, start=1):
        assert stop_features(probs[:, :s], feature_set).shape == (7, width)


def test_history_features_on_a_hand_example():
    history = torch.tensor(
        [[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]]]
    )  # arg-max 0, 1, 1; ensemble (1/3, 1.5/3, 0.5/3) -> arg-max 1
    features = stop_features(history, "history")[0]
    confidence = features[:4]
    torch.testing.assert_close(confidence[0], torch.log(torch.tensor(0.5 / 0.5)))  # log-odds
    torch.testing.assert_close(confidence[1], torch.tensor(0.2))  # softmax margin
    torch.testing.assert_close(confidence[3], torch.log(torch.tensor(0.5 / 0.3)))  # logit margin
    earlier_max, agreement = features[4:6], features[6:8]
    torch.testing.assert_close(earlier_max, torch.log(torch.tensor([0.7 / 0.3, 0.8 / 0.2])))
    assert agreement.tolist() == [0.0, 1.0]
    torch.testing.assert_close(features[8], torch.log(torch.tensor(0.5 / 0.5)))
    assert features[9] == 1.0


def test_ensemble_probs_is_the_mean_of_visited_softmaxes():
    history = torch.randn(6, 4, 3).softmax(-1)
    torch.testing.assert_close(ensemble_probs(history), history.mean(1))
    torch.testing.assert_close(ensemble_confidence(history), history.mean(1).max(-1).values)


def test_bad_arguments_are_named():
    probs, labels = difficulty_cascade(50, seed=9)
    with pytest.raises(ValueError, match="feature_set"):
        stop_features(probs, "logits")
    with pytest.raises(ValueError, match="answer"):
        fit_continuation_rule(probs, labels, CUMULATIVE_COSTS, 0.1, answer="vote")
    with pytest.raises(ValueError, match="cumulative_costs"):
        fit_continuation_rule(probs, labels, [0.1, 1.0], 0.1)
    with pytest.raises(ValueError, match="history"):
        stop_features(probs[:, 0], "history")
