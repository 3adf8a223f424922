"""REINFORCE's warm start: the stopping modules imitate a rule fitted on held-out outputs."""

import dataclasses
import json
import signal

import pytest
import torch

from conftest import digits_harness
from policycascade.agents.continuation import ContinuationValueRule
from policycascade.agents.reinforce_warm_start import (
    fit_warm_start_rule,
    imitate,
    stop_agreement,
    stop_targets,
)
from policycascade.agents.stopping_policy import StoppingPolicy
from policycascade.agents.thresholds import ThresholdRule, best_reward_rule, confidence
from policycascade.cascade import CascadeOutputs
from policycascade.checkpoint import load_checkpoint
from policycascade.config import ConfigError, TrainConfig
from policycascade.costs import StageCosts
from policycascade.harness import TrainingInterrupted
from policycascade.train import main

K, C, N = 3, 4, 256


def _softmaxes(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, K, C, generator=g) * 2.5).softmax(-1)


def _median_rule(probs):
    """Max-softmax thresholds at each stage's median: about half the decisions are *stop*."""
    medians = confidence(probs[:, : K - 1], "max-softmax").median(0).values
    return ThresholdRule("max-softmax", medians.tolist())


def test_stop_targets_are_the_rules_decisions_by_hand():
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]],
            [[0.55, 0.45], [0.8, 0.2], [0.5, 0.5]],
        ]
    )
    rule = ThresholdRule("max-softmax", [0.7, 0.8])  # stop where max-softmax >= threshold
    assert stop_targets(rule, probs).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_imitation_reproduces_a_hand_built_rule_that_a_fresh_policy_does_not():
    probs = _softmaxes()
    targets = stop_targets(_median_rule(probs), probs)
    assert 0.4 < float(targets.mean()) < 0.6
    torch.manual_seed(0)
    # sorted inputs: a max-softmax threshold is a half-space of them (in class order the
    # module must learn a max over positions, slower on these flat random softmaxes)
    policy = StoppingPolicy(K, C, hidden=16, inputs="sorted-log-probs")
    # one constant decision per stage is right on about half the samples at best
    assert stop_agreement(policy, probs, targets) < 0.75
    rng = torch.get_rng_state()
    imitate(policy, probs, targets, epochs=60, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)  # the global random state is not drawn on
    assert stop_agreement(policy, probs, targets) > 0.95
    held_out = _softmaxes(seed=1)  # the same rule, on softmaxes it never saw
    assert stop_agreement(policy, held_out, stop_targets(_median_rule(probs), held_out)) > 0.85


def test_imitation_refuses_targets_of_the_wrong_shape():
    policy, probs = StoppingPolicy(K, C), _softmaxes(8)
    with pytest.raises(ValueError, match=r"targets must be \(sample, K - 1\)"):
        imitate(policy, probs, torch.zeros(8, K), epochs=1)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        imitate(policy, probs, torch.zeros(8, K - 1), epochs=0)


def _outputs(seed=0):
    probs = _softmaxes(seed=seed)
    labels = torch.where(torch.rand(N) < 0.8, probs[:, -1].argmax(-1), torch.randint(C, (N,)))
    costs = StageCosts([10, 40, 100])
    return CascadeOutputs(probs=probs, labels=labels, costs=costs, names=["a", "b", "c"])


def test_the_fitted_rules_are_the_continuation_rule_and_the_best_thresholds():
    outputs = _outputs()
    rule = fit_warm_start_rule(outputs, 0.01, "rule", seed=0)
    assert isinstance(rule, ContinuationValueRule) and rule.feature_set == "confidence"
    torch.testing.assert_close(rule.cumulative_costs, torch.tensor([0.1, 0.5, 1.5]))
    thresholds = fit_warm_start_rule(outputs, 0.01, "thresholds")
    expected = best_reward_rule(outputs.probs, outputs.labels, outputs.costs, 0.01)
    assert (thresholds.criterion, thresholds.thresholds) == (
        expected.criterion,
        expected.thresholds,
    )
    with pytest.raises(ValueError, match="warm_start must be one of .* got 'none'"):
        fit_warm_start_rule(outputs, 0.01, "none")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"warm_start": "always"}, "warm_start must be one of .* got 'always'"),
        ({"warm_start": "rule", "warm_start_epochs": 0}, "warm_start_epochs must be >= 1, got 0"),
        (
            {"warm_start": "none", "warm_start_epochs": 50},
            "warm_start_epochs=50 would be ignored: warm_start is 'none'",
        ),
    ],
)
def test_config_errors_name_the_field_and_value(changes, message):
    defaults = TrainConfig(agent="reinforce")
    config = dataclasses.replace(
        defaults, reinforce=dataclasses.replace(defaults.reinforce, **changes)
    )
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_help_lists_the_warm_start_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--warm-start {none,rule,thresholds}" in text and "--warm-start-epochs" in text


WARM = {"pretrain_epochs": 2, "epochs": 2, "warm_start": "rule", "warm_start_epochs": 30}


def test_warm_started_run_resumed_after_the_imitation_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    import policycascade.checkpointing as checkpointing

    a = digits_harness(tmp_path / "a", **WARM).run()
    warm = a["warm_start"]
    assert warm["kind"] == "rule" and warm["agreement"] > 0.9 > warm["agreement_before"]

    real_save = checkpointing.save_atomic

    def save_then_signal(state, path):
        real_save(state, path)
        if state["epoch"] == WARM["pretrain_epochs"]:  # the last pre-training epoch + warm start
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpointing, "save_atomic", save_then_signal)
    with pytest.raises(TrainingInterrupted):
        digits_harness(tmp_path / "b", **WARM).run()
    monkeypatch.setattr(checkpointing, "save_atomic", real_save)
    resumed = digits_harness(tmp_path / "b", **WARM)
    resumed.load(load_checkpoint(tmp_path / "b"))
    assert resumed.epoch == WARM["pretrain_epochs"]
    assert json.dumps(resumed.run()) == json.dumps(a)  # bit for bit on the CPU


def test_runs_stored_before_the_new_defaults_read_as_they_ran():
    from policycascade.runs import stored_config

    values = TrainConfig(agent="reinforce").to_dict()
    assert (values["reinforce"]["warm_start"], values["reinforce"]["policy_gradient"]) == (
        "rule",
        "exact",
    )  # today's defaults
    for key in ("warm_start", "warm_start_epochs", "policy_gradient"):
        del values["reinforce"][key]  # a run stored before these options or defaults
    old = stored_config(values)
    assert (old.reinforce.warm_start, old.reinforce.policy_gradient) == ("none", "score-function")
    assert stored_config(TrainConfig(agent="reinforce").to_dict()) == TrainConfig(agent="reinforce")
