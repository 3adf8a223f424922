import pytest
import torch

from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule
from policycascade.subsets import (
    best_subset,
    candidate_subsets,
    sub_costs,
    sub_outputs,
    threshold_search,
)


def useless_middle(n: int = 400, hard_share: float = 0.25, seed: int = 0) -> CascadeOutputs:
    """K=3, C=4, MACs 10/100/1000: stage 1 repeats stage 0's softmax, stage 2 is always right.

    Stage 0 answers easy samples right with p=0.9 and hard ones wrong with p=0.5.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    hard = torch.arange(n) < int(hard_share * n)
    cheap = torch.full((n, 4), 0.1 / 3)
    cheap[torch.arange(n), labels] = 0.9
    wrong = (labels + 1) % 4
    cheap[hard] = 0.5 / 3
    cheap[hard, wrong[hard]] = 0.5
    best = torch.full((n, 4), 0.01)
    best[torch.arange(n), labels] = 0.97
    probs = torch.stack([cheap, cheap, best], dim=1)
    return CascadeOutputs(probs, labels, StageCosts([10, 100, 1000]))


def test_candidates_keep_the_last_classifier_unless_all_subsets_are_asked_for():
    assert candidate_subsets(3) == [(0, 2), (1, 2), (0, 1, 2)]
    assert candidate_subsets(3, all_subsets=True) == [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert len(candidate_subsets(5)) == 2**4 - 1
    assert len(candidate_subsets(5, all_subsets=True)) == 2**5 - 5 - 1
    with pytest.raises(ValueError, match="num_stages=1"):
        candidate_subsets(1)


def test_sub_outputs_select_stages_and_keep_the_full_reference(outputs):
    sub = sub_outputs(outputs, [0, 1])
    torch.testing.assert_close(sub.probs, outputs.probs[:, :2])
    assert sub.costs.classifier_macs == [10, 30]
    assert sub.costs.reference_macs == 100  # the full cascade's dearest classifier
    assert sub.costs.stage_costs == pytest.approx([0.1, 0.3])
    assert sub.costs.with_policy_macs([5, 5]).reference_macs == 100


def test_skipping_an_exit_of_one_trunk_pays_its_blocks_not_its_head():
    # blocks 10/20/30, heads 1/2/3: stage t costs block t + head t; exit t alone the trunk to t
    costs = StageCosts([11, 22, 33], alone_macs=[11, 32, 63])
    assert sub_costs(costs, [0, 2]).classifier_macs == [11, 20 + 30 + 3]
    assert sub_costs(costs, [1, 2]).classifier_macs == [32, 33]
    assert sub_costs(costs, [0, 2]).alone_macs == [11, 63]
    assert sub_costs(costs, [0, 1]).reference_macs == 63


@pytest.mark.parametrize("stages", [[0], [1, 0], [0, 0, 2], [0, 3]])
def test_bad_stage_lists_are_named(outputs, stages):
    with pytest.raises(ValueError, match="stages"):
        sub_outputs(outputs, stages)


def test_the_useless_middle_stage_is_dropped_and_saves_its_macs_at_equal_accuracy():
    val, test = useless_middle(seed=0), useless_middle(seed=1)
    choice = best_subset(val, test, stage_names=["cheap", "copy", "big"], sweep_points=4)
    assert choice.target == "accuracy" and choice.target_value == 1.0
    assert choice.best.stages == (0, 2) and choice.best.names == ("cheap", "big")
    assert [s.stages for s in choice.subsets] == candidate_subsets(3)
    assert all(s.feasible for s in choice.subsets)
    # the hard quarter runs stage 2 (1000 MACs) after stage 0; the full cascade adds stage 1
    assert choice.best.val_mean_macs == pytest.approx(10 + 0.25 * 1000)
    assert choice.full.val_mean_macs == pytest.approx(10 + 0.25 * 1100)
    assert choice.test["accuracy"] == choice.full_test["accuracy"] == 1.0
    assert choice.macs_saved == pytest.approx(1 - 260 / 285)
    rule_test = evaluate_rule(choice.best.rule, sub_outputs(test, (0, 2)))
    assert rule_test == choice.test
    assert choice.as_dict()["best"]["stages"] == [0, 2]


def test_a_budget_target_picks_the_most_accurate_subset_within_it():
    val = useless_middle()
    choice = best_subset(val, val, "entropy", macs_budget=270, sweep_points=3)
    assert choice.target == "budget"
    assert choice.best.stages == (0, 2) and choice.best.val_accuracy == 1.0
    assert choice.full.val_accuracy < 1.0 and choice.full.val_mean_macs <= 270


def test_an_own_search_and_subset_list_are_used():
    val = useless_middle()
    choice = best_subset(
        val, val, threshold_search("softmax-margin"), subsets=[(1, 2)], sweep_points=3
    )
    assert [s.stages for s in choice.subsets] == [(1, 2), (0, 1, 2)]  # full one added
    assert choice.best.stages == (0, 1, 2)  # (1, 2) pays 100 MACs for every sample
    with pytest.raises(ValueError, match="not both"):
        best_subset(val, val, target_accuracy=0.9, macs_budget=10)
