"""The sorted per-stage evaluation of a threshold search equals the brute-force one exactly."""

from __future__ import annotations

import torch

from policycascade.agents.thresholds import ScoreSearch, ThresholdRule, ThresholdSearch
from policycascade.costs import StageCosts


def random_search(seed: int, n: int = 60, k: int = 4, c: int = 3) -> ScoreSearch:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, c, generator=g) * 2
    # coarse scores so that ties between samples and candidates are common
    probs = (logits.softmax(-1) * 8).round() / 8 + 1e-3
    probs = probs / probs.sum(-1, keepdim=True)
    labels = torch.randint(0, c, (n,), generator=g)
    macs = torch.randint(1, 50, (k,), generator=g).tolist()
    costs = StageCosts(classifier_macs=macs, policy_macs=[0] * k)
    return ThresholdSearch(probs, labels, costs, "max-softmax", num_candidates=None)


def test_stage_evaluation_equals_brute_force_on_random_searches():
    for seed in range(15):
        search = random_search(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        for _ in range(5):
            pool = torch.cat([search.scores.flatten(), torch.tensor([float("inf"), -float("inf")])])
            current = pool[torch.randint(0, len(pool), (search.scores.shape[1],), generator=g)]
            for t in range(len(current)):
                candidates = search.candidates[t]
                trials = current.repeat(len(candidates), 1)
                trials[:, t] = candidates
                acc, macs = search.evaluate_many(trials)
                fast_acc, fast_macs = search.evaluate_stage(current, t, candidates)
                assert torch.equal(acc, fast_acc), (seed, t)
                assert torch.equal(macs, fast_macs), (seed, t)


def test_fitted_rules_match_the_brute_force_search():
    """Forcing the brute-force path gives the same thresholds for every fitting mode."""
    for seed in range(6):
        fast, slow = random_search(seed), random_search(seed)
        slow._integral_macs = False
        ref = fast.reference_macs
        pairs = [
            (fast.for_accuracy_drop(0.01), slow.for_accuracy_drop(0.01)),
            (fast.for_budget(0.4 * ref), slow.for_budget(0.4 * ref)),
            (fast.for_reward(1e-2), slow.for_reward(1e-2)),
        ]
        for a, b in pairs:
            assert isinstance(a, ThresholdRule)
            assert a.thresholds == b.thresholds


def test_shared_scores_equal_each_rules_own_scores():
    """compare evaluates a family's rules from one confidence pass: the same scores exactly."""
    from policycascade.agents.thresholds import ALL_CRITERIA, ShiftedRule, shared_stop_scores

    g = torch.Generator().manual_seed(7)
    probs = torch.randn(50, 4, 5, generator=g).softmax(-1)
    memo: dict = {}
    rules = []
    for criterion in ALL_CRITERIA:
        for temps in (None, [0.5, 1.0, 2.0, 1.5]):
            for thresholds in ([0.1, 0.5, 0.9], [-1.0, float("inf"), 0.3]):
                rules.append(ThresholdRule(criterion, thresholds, temps))
    base = ThresholdRule("entropy", [0.0, 0.0, 0.0])
    rules += [ShiftedRule(base, [0.2, -0.1, 0.0]), ShiftedRule(base, [0.0, 0.3, -2.0])]
    for rule in rules:
        assert torch.equal(shared_stop_scores(rule, probs, memo), rule.stop_scores(probs))
    # one pass per criterion and temperature setting, and one for the shifted rules' base
    assert len(memo) == 2 * len(ALL_CRITERIA) + 1
    later = probs[:10, :2]  # other outputs (early exit: two stages seen) are other entries
    assert torch.equal(shared_stop_scores(rules[0], later, memo), rules[0].stop_scores(later))


def test_evaluate_rule_refuses_stop_scores_of_another_shape():
    import pytest

    from conftest import random_outputs
    from policycascade.evaluation import evaluate_rule

    outputs = random_outputs(20, 3, 4)
    rule = ThresholdRule("max-softmax", [0.5, 0.5])
    given = rule.stop_scores(outputs.probs)
    assert evaluate_rule(rule, outputs, given) == evaluate_rule(rule, outputs)
    for bad in (given[:5], given[:, :1], [[0.0, 0.0]] * 20):
        with pytest.raises(ValueError, match="stop_scores must be a tensor of shape"):
            evaluate_rule(rule, outputs, bad)
