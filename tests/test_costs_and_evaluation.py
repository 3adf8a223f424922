import pytest
import torch
from torch import nn

from conftest import hand_outputs
from policycascade.agents import LearnedRule, StoppingPolicy
from policycascade.agents.rules import StoppingRule, stop_decisions
from policycascade.agents.stopping_policy import ensemble_predictions, policy_features
from policycascade.agents.thresholds import ThresholdRule
from policycascade.cascade import Cascade
from policycascade.costs import StageCosts, count_macs
from policycascade.evaluation import evaluate_exits, evaluate_rule, first_stop
from policycascade.models import build_cascade


def test_count_macs_of_linear_and_conv_by_hand():
    assert count_macs(nn.Linear(16, 10), torch.zeros(1, 16)) == 160
    # 3x3 conv, 2 -> 4 channels, 8x8 output: 8*8*4 outputs x 2*3*3 MACs each
    assert count_macs(nn.Conv2d(2, 4, 3, padding=1), torch.zeros(1, 2, 8, 8)) == 8 * 8 * 4 * 18
    with pytest.raises(ValueError, match="one sample"):
        count_macs(nn.Linear(2, 2), torch.zeros(3, 2))


def test_stage_costs_normalise_by_most_expensive_classifier():
    costs = StageCosts([10, 30, 100], [5, 5, 5])
    assert costs.policy_macs == [5, 5, 0]  # the last stage has no stopping module
    assert costs.stage_macs == [15, 35, 100]
    assert costs.cumulative_macs == [15, 50, 150]
    assert costs.stage_costs == pytest.approx([0.15, 0.35, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        StageCosts([10])
    with pytest.raises(ValueError, match="finite number > 0"):
        StageCosts([10, 0])


def test_stopping_module_macs_are_measured():
    policy = StoppingPolicy(num_stages=3, num_classes=10, hidden=16)
    assert policy.policy_macs() == [10 * 16 + 16 * 16 + 16] * 2 + [0]


def test_digits_cascade_costs_grow_and_stages_are_measured():
    cascade = build_cascade("digits", (1, 8, 8), 10)
    macs = cascade.classifier_macs()
    assert macs[0] == 160 and macs[2] == 64 * 256 + 256 * 10
    assert all(b > 5 * a for a, b in zip(macs, macs[1:], strict=False))


def test_cascade_rejects_wrong_output_size_and_single_stage():
    with pytest.raises(ValueError, match="at least 2"):
        Cascade([nn.Linear(4, 3)], (4,), 3)
    cascade = Cascade([nn.Linear(4, 3), nn.Linear(4, 5)], (4,), 3, ["a", "b"])
    with pytest.raises(ValueError, match="'b' must map a batch to \\(batch, 3\\)"):
        cascade.classifier_macs()


def test_evaluate_exits_by_hand():
    out = hand_outputs()
    # sample 0 exits at stage 1 (right), sample 1 exits at stage 0 (right)
    m = evaluate_exits(out, torch.tensor([1, 0]))
    assert m["accuracy"] == 1.0
    assert m["mean_macs"] == pytest.approx((40 + 10) / 2)
    assert m["macs_share"] == pytest.approx(25 / 100)
    assert m["exit_distribution"] == [0.5, 0.5, 0.0]
    assert m["stage_accuracy"] == [0.5, 1.0, 0.5]
    assert m["accuracy_by_exit"][0] == [1.0, 1.0, 1.0]  # sample 1 at every classifier
    assert m["accuracy_by_exit"][1] == [0.0, 1.0, 0.0]  # sample 0 at every classifier


def test_first_stop_and_ensemble():
    stop = torch.tensor([[False, True, False], [False, False, False], [True, True, False]])
    assert first_stop(stop).tolist() == [1, 2, 0]  # the last stage always stops
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    # weights 0.5 (stage 0) and 1 (stage 1): mix = [0.65, 0.85] -> class 1
    assert ensemble_predictions(probs, torch.tensor([[0.5, 1.0]]), torch.tensor([1])).item() == 1
    # a confident first stage outweighs the second
    assert ensemble_predictions(probs, torch.tensor([[3.0, 1.0]]), torch.tensor([1])).item() == 0


def separate_module(num_classes: int, hidden: int) -> nn.Sequential:
    """One stage's stopping module written out: Linear-ReLU-Linear-ReLU-Linear -> stop logit."""
    return nn.Sequential(
        nn.Linear(num_classes, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def test_stacked_stopping_policy_equals_separate_modules():
    """The batched forward computes what K - 1 separate MLPs with the same weights do."""
    torch.manual_seed(0)
    policy = StoppingPolicy(num_stages=4, num_classes=5, hidden=7)
    rule = LearnedRule(policy)
    probs = torch.randn(9, 4, 5).softmax(-1)
    decisions = stop_decisions(rule, probs)
    for t in range(3):
        module = separate_module(5, 7)
        with torch.no_grad():
            for linear, name in zip(
                [module[0], module[2], module[4]], StoppingPolicy.LAYERS, strict=True
            ):
                linear.weight.copy_(getattr(policy, f"{name}_weight")[t].T)
                linear.bias.copy_(getattr(policy, f"{name}_bias")[t, 0])
        expected = module(policy_features(probs[:, t])).squeeze(-1)
        torch.testing.assert_close(policy(probs)[:, t], expected)
        # stage t's logit from the history of the first t + 1 stages only
        torch.testing.assert_close(policy(probs[:, : t + 1])[:, t], expected)
        assert decisions[:, t].tolist() == (expected >= 0).tolist()
    assert decisions[:, 3].all()  # the last stage always stops
    assert policy(probs).shape == (9, 3) and policy(probs[:, :2]).shape == (9, 2)
    assert sum(p.numel() for p in policy.parameters()) == 3 * sum(
        p.numel() for p in separate_module(5, 7).parameters()
    )


def test_sorted_inputs_make_the_policy_blind_to_class_order():
    torch.manual_seed(0)
    probs = torch.randn(6, 3, 5).softmax(-1)
    shuffled = probs[..., torch.tensor([3, 0, 4, 1, 2])]
    sorted_policy = StoppingPolicy(num_stages=3, num_classes=5, hidden=8, inputs="sorted-log-probs")
    torch.testing.assert_close(sorted_policy(shuffled), sorted_policy(probs))
    plain = StoppingPolicy(num_stages=3, num_classes=5, hidden=8)
    plain.load_state_dict(sorted_policy.state_dict())
    assert not torch.allclose(plain(shuffled), plain(probs))  # class order matters without sorting
    descending = probs.sort(-1, descending=True).values
    torch.testing.assert_close(sorted_policy(probs), plain(descending))
    with pytest.raises(ValueError, match="policy_inputs must be one of"):
        StoppingPolicy(num_stages=3, num_classes=5, inputs="probs")


def test_outputs_and_count_macs_give_every_module_its_own_training_flag_back():
    """A classifier kept in eval mode inside a training cascade stays in eval mode."""
    cascade = Cascade([nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Linear(4, 3)], (4,), 3)
    cascade.train()
    cascade.classifiers[0].eval()
    flags = [m.training for m in cascade.modules()]
    cascade.outputs(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), StageCosts([1, 2]))
    assert [m.training for m in cascade.modules()] == flags
    count_macs(cascade, torch.randn(1, 4))
    cascade.classifier_macs()
    assert [m.training for m in cascade.modules()] == flags


class ChargedRule:
    """Max-softmax >= 0.5 that says it costs 7 MACs at every stage but the last."""

    num_stages = 3

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        return history[:, :2].max(-1).values - 0.5

    def policy_macs(self) -> list[int]:
        return [7, 7, 0]


def test_evaluate_rule_charges_the_rules_own_policy_macs():
    # hand outputs carry no policy cost; sample 0 (stage-0 conf 0.6) exits at stage 0,
    # sample 1 (0.5) too: both pay classifier 0 plus the rule's 7 MACs
    out = hand_outputs()
    rule = ChargedRule()
    assert isinstance(rule, StoppingRule)
    m = evaluate_rule(rule, out)
    assert m["exit_distribution"] == [1.0, 0.0, 0.0]
    assert m["mean_macs"] == 10 + 7
    assert m["accuracy"] == 0.5 and m["macs_share"] == pytest.approx(17 / 100)
    # outputs that already carry another rule's policy cost are re-priced with this rule's
    charged_elsewhere = out.with_costs(out.costs.with_policy_macs([1000, 1000, 1000]))
    assert evaluate_rule(rule, charged_elsewhere)["mean_macs"] == 17
    # a rule that never stops early pays its module at stages 0 and 1, not at the last
    never = ThresholdRule("max-softmax", [float("inf")] * 2)
    assert evaluate_rule(never, out)["mean_macs"] == 140  # a threshold rule costs nothing
    learned = LearnedRule(StoppingPolicy(3, 3, hidden=4))
    with torch.no_grad():
        learned.policy.layer3_bias.fill_(-1e3)  # never stop early
    per_stage = learned.policy_macs()
    assert per_stage[0] > 0 and per_stage[-1] == 0
    assert evaluate_rule(learned, out)["mean_macs"] == 140 + per_stage[0] + per_stage[1]
