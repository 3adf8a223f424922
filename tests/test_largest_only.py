"""The largest classifier alone: a rule that skips every earlier stage and pays only the last."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import hand_outputs
from policycascade.agents.rules import LargestOnlyRule, exit_stages, skips_to_last
from policycascade.agents.thresholds import ShiftedRule, ThresholdRule
from policycascade.cascade import CascadeOutputs
from policycascade.certify import Target, certified_fit
from policycascade.certify_paths import answers_with_last_classifier
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule, exit_costs
from policycascade.rule_io import load_rule, rule_to_dict, save_rule
from policycascade.serving import ServingRule, load_serving_rule
from policycascade.watch import DriftWatch, exit_costs_of


def test_hand_cascade_costs_exactly_the_last_classifier_and_answers_with_it():
    out = hand_outputs()  # MACs 10 / 30 / 100; sample 0's last stage is wrong, sample 1's right
    alone = evaluate_rule(LargestOnlyRule(3), out)
    assert alone["mean_macs"] == 100 and alone["macs_share"] == 1.0
    assert alone["accuracy"] == 0.5
    assert alone["exit_distribution"] == [0.0, 0.0, 1.0]
    every_stage = evaluate_rule(ThresholdRule("max-softmax", [math.inf, math.inf]), out)
    assert every_stage["mean_macs"] == 140 and every_stage["macs_share"] == 1.4
    assert every_stage["accuracy"] == alone["accuracy"]


def test_it_pays_no_stopping_module_and_the_last_classifier_alone_of_a_shared_trunk():
    # one network's exits: stage t adds an increment, exit t alone runs the trunk up to t
    costs = StageCosts([10, 20, 70], policy_macs=[3, 5, 0], alone_macs=[10, 30, 100])
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]] * 4)
    out = CascadeOutputs(probs, torch.tensor([1, 1, 0, 1]), costs)
    rule = LargestOnlyRule(3)
    assert exit_costs(rule, costs)[-1] == 100
    assert exit_costs_of(rule, costs)[-1] == 100.0
    metrics = evaluate_rule(rule, out)
    assert metrics["mean_macs"] == 100 and metrics["accuracy"] == 0.75
    # a ThresholdRule with stopping modules of 3 and 5 MACs that never stops pays them
    assert exit_costs(ShiftedRule(_Costly(), [math.inf, math.inf]), costs)[-1] == 108


class _Costly:
    """A rule whose stopping modules cost 3 and 5 MACs."""

    num_stages = 3

    def stop_scores(self, history):
        return torch.zeros(len(history), min(history.shape[1], 2), dtype=torch.float64)

    def policy_macs(self):
        return [3, 5, 0]


def test_the_rule_decides_as_one_that_never_stops_and_refuses_bad_sizes():
    rule = LargestOnlyRule(4)
    probs = torch.rand(7, 4, 3).softmax(-1)
    assert exit_stages(rule, probs).tolist() == [3] * 7
    assert rule.stop_scores(probs[:, :2]).shape == (7, 2)
    assert skips_to_last(rule) and not skips_to_last(ThresholdRule("max-softmax", [0.5] * 3))
    assert rule == LargestOnlyRule(4) and rule != LargestOnlyRule(3)
    for bad in (1, True, 2.0):
        with pytest.raises(ValueError, match="num_stages must be an integer >= 2"):
            LargestOnlyRule(bad)


def _confident_middle(n: int, seed: int) -> CascadeOutputs:
    """Stage 0 is never confident; stage 1 is sure (0.99) and right on 40%, else 0.6 and
    wrong; stage 2 is always right. Costs 50 / 50 / 100: exiting at 1 costs 100, at 2 200."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    sure = torch.rand(n, generator=g) < 0.4
    probs = torch.empty(n, 3, 2)
    probs[:, 0] = 0.5
    right = torch.nn.functional.one_hot(labels, 2).float()
    p1 = torch.where(sure, 0.99, 0.4).unsqueeze(1)  # 0.4 on the label: 0.6 on the wrong class
    probs[:, 1] = p1 * right + (1 - p1) * (1 - right)
    probs[:, 2] = 0.9 * right + 0.1 * (1 - right)
    return CascadeOutputs(probs, labels, StageCosts([50, 50, 100]))


def test_certified_rules_dearer_than_the_largest_alone_give_way_to_it():
    calibration = _confident_middle(2000, 0)
    fit = certified_fit(calibration, Target.accuracy_drop(0.01), 0.1, path="fixed")
    assert fit.certified  # rules stopping at stage 1 when it is sure passed...
    assert isinstance(fit.rule, LargestOnlyRule)  # ...but cost 160 MACs on average, not 100
    assert fit.p_value == 0.0 and "cheaper than every certified path rule" in fit.message
    metrics = evaluate_rule(fit.rule, _confident_middle(1000, 1))
    assert metrics["macs_share"] == 1.0 and metrics["accuracy"] == 1.0


def test_nothing_certified_falls_back_to_exactly_the_largest_classifier():
    calibration = _confident_middle(20, 2)
    for target in (Target.accuracy_drop(0.0), Target.accuracy(0.999)):
        fit = certified_fit(calibration, target, 0.05, path="fixed")
        assert not fit.certified and isinstance(fit.rule, LargestOnlyRule)
        assert "fell back to the largest classifier alone" in fit.message
        assert evaluate_rule(fit.rule, calibration)["macs_share"] == 1.0
    both = certified_fit(calibration, Target.accuracy_drop(0.0), 0.05)  # path "both"
    assert isinstance(both.rule, LargestOnlyRule)


def test_a_budget_keeps_its_first_stage_end_and_ensembles_keep_their_own():
    calibration = _confident_middle(20, 3)
    fit = certified_fit(calibration, Target.budget(0.01), 0.05, path="fixed")
    assert isinstance(fit.rule, ThresholdRule) and fit.rule.thresholds == [-math.inf] * 2
    ensemble = ThresholdRule("ensemble", [0.5, 0.5])
    assert not answers_with_last_classifier(ensemble)
    assert not answers_with_last_classifier(ShiftedRule(ensemble, [0.0, 0.0]))
    assert answers_with_last_classifier("max-softmax")
    assert answers_with_last_classifier(ShiftedRule(ThresholdRule("entropy", [0, 0]), [0, 0]))
    fit = certified_fit(calibration, Target.accuracy_drop(0.0), 0.05, family=ensemble)
    assert isinstance(fit.rule, ShiftedRule) and fit.rule.offsets == [math.inf] * 2


def test_saved_served_and_watched(tmp_path):
    out = hand_outputs()
    rule = LargestOnlyRule(3)
    data = save_rule(rule, tmp_path / "rule.json", outputs=out)
    assert data["family"] == "largest-only"
    assert data["calibration"]["mean_cost"] == 100 and data["calibration"]["exit_shares"] == [
        0.0,
        0.0,
        1.0,
    ]
    assert load_rule(tmp_path / "rule.json", outputs=out) == rule
    served = load_serving_rule(tmp_path / "rule.json")
    assert served.skips_to_last
    exit_stage, answer = served.predict(out.probs.numpy())
    assert exit_stage.tolist() == [2, 2] and answer.tolist() == [2, 2]
    assert (
        served.stop_at(2, out.probs.numpy()).all() and not served.stop_at(0, out.probs.numpy())[0]
    )
    assert np.isneginf(served.stop_scores(out.probs.numpy())).all()
    plain = ServingRule(json.loads(json.dumps(rule_to_dict(ThresholdRule("max-softmax", [1, 1])))))
    assert not plain.skips_to_last
    watch = DriftWatch.from_calibration(data["calibration"], exit_costs_of(rule, out.costs))
    assert watch.calibration()["mean_cost"] == 100
    assert watch.update(np.full(500, 2)) == []


def test_early_exit_predict_runs_only_the_last_classifier_for_the_fallback():
    """Live inference agrees with evaluate_rule: one classifier runs, at its own MACs."""
    from policycascade.inference import early_exit_predict
    from policycascade.models import build_cascade

    torch.manual_seed(0)
    cascade = build_cascade("digits", (1, 8, 8), 10).eval()
    x = torch.randn(7, 1, 8, 8)
    rule = LargestOnlyRule(cascade.num_stages)
    costs = cascade.costs(rule.policy_macs())  # counting MACs runs the classifiers once
    calls = []
    for t, clf in enumerate(cascade.classifiers):
        clf.register_forward_hook(lambda m, i, o, t=t: calls.append(t))
    result = early_exit_predict(cascade, rule, x, costs)
    assert calls == [cascade.num_stages - 1]
    assert result.exit_stage.tolist() == [cascade.num_stages - 1] * 7
    assert result.macs.tolist() == [costs.alone_macs[-1]] * 7
    with torch.no_grad():
        expected = cascade.classifiers[-1](x).argmax(-1)
    assert torch.equal(result.predictions, expected)


def test_an_exported_fallback_runs_only_the_last_classifier_when_loaded(tmp_path):
    """export_bundle keeps the fallback's promise: the loaded bundle runs one program."""
    from policycascade.inference import early_exit_predict, export_bundle, load_bundle
    from policycascade.models import build_cascade

    torch.manual_seed(0)
    cascade = build_cascade("digits", (1, 8, 8), 10).eval()
    rule = LargestOnlyRule(cascade.num_stages)
    export_bundle(tmp_path / "fallback.pt", cascade, rule)
    bundle = load_bundle(tmp_path / "fallback.pt")
    assert bundle.last_stage_only
    calls = []
    for t, program in enumerate(list(bundle.classifiers)):
        bundle.classifiers[t] = lambda x, t=t, program=program: calls.append(t) or program(x)
    x = torch.randn(5, 1, 8, 8)
    result = bundle.predict(x)
    assert calls == [cascade.num_stages - 1]
    live = early_exit_predict(cascade, rule, x)
    assert torch.equal(result.predictions, live.predictions)
    assert result.exit_stage.tolist() == [cascade.num_stages - 1] * 5
    assert result.macs.tolist() == live.macs.tolist() == [cascade.costs().alone_macs[-1]] * 5
