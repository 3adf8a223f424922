import pytest
import torch
from torch import nn

from conftest import hand_outputs
from policycascade.agents import StoppingModule, StoppingPolicy
from policycascade.agents.stopping_policy import policy_features
from policycascade.cascade import Cascade
from policycascade.costs import StageCosts, count_macs
from policycascade.evaluation import ensemble_predictions, evaluate_exits, first_stop
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


def test_stacked_stopping_policy_equals_separate_modules():
    """The batched forward computes what K - 1 separate StoppingModules with the same weights do."""
    torch.manual_seed(0)
    policy = StoppingPolicy(num_stages=4, num_classes=5, hidden=7)
    probs = torch.randn(9, 4, 5).softmax(-1)
    for t in range(3):
        module = StoppingModule(5, 7)
        with torch.no_grad():
            for linear, name in zip(
                [module[0], module[2], module[4]], StoppingPolicy.LAYERS, strict=True
            ):
                linear.weight.copy_(getattr(policy, f"{name}_weight")[t].T)
                linear.bias.copy_(getattr(policy, f"{name}_bias")[t, 0])
        expected = module(policy_features(probs[:, t])).squeeze(-1)
        torch.testing.assert_close(policy(probs)[:, t], expected)
        torch.testing.assert_close(policy.stage_logits(t, probs[:, t]), expected)
        assert policy.stop_at_stage(t, probs[:, t]).tolist() == (expected >= 0).tolist()
    assert policy.stop_at_stage(3, probs[:, 3]).all()
    assert sum(p.numel() for p in policy.parameters()) == 3 * sum(
        p.numel() for p in StoppingModule(5, 7).parameters()
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
