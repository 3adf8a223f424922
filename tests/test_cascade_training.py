"""Per-sample loss weights in the training loop and the classifiers-for-the-cascade weightings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policycascade.cascade import CascadeOutputs
from policycascade.cascade_training import (
    CascadeTraining,
    cascade_aware_weights,
    defer_weights,
    exit_weights,
    split_outputs,
    stage_weights,
    train_for_cascade,
    validation_key,
    weighted_stage_accuracy,
)
from policycascade.costs import StageCosts
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.seeding import seeded
from policycascade.supervised import ClassifierFitting, cross_entropy_all_stages, fit_classifiers

TRAINED = [None, frozenset(range(8)), None]  # the specialist cascade's trained classes


def random_logits(seed: int, batch: int = 12, k: int = 3, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, c, generator=g)
    labels = torch.randint(0, c, (batch,), generator=g)
    weights = torch.rand(batch, k, generator=g) * 3
    return logits, labels, weights


@pytest.mark.parametrize("seed", range(5))
def test_weighted_loss_is_each_stages_weighted_mean(seed):
    logits, labels, weights = random_logits(seed)
    trained = [None, {0, 1, 2}, None]
    got = cross_entropy_all_stages(logits, labels, trained, weights)
    expected = 0.0
    for t in range(3):
        ce = F.cross_entropy(logits[:, t], labels, reduction="none")
        w = weights[:, t].clone()
        if trained[t] is not None:
            w = w * torch.isin(labels, torch.tensor(sorted(trained[t]))).float()
        expected += float((w * ce).sum() / w.sum())
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # only relative weights within a stage count
    assert float(cross_entropy_all_stages(logits, labels, trained, weights * 7)) == pytest.approx(
        float(got), rel=1e-5
    )


@pytest.mark.parametrize("trained", [None, [None, {1, 3}, None]])
def test_unit_weights_equal_the_unweighted_loss_and_zero_stages_add_nothing(trained):
    logits, labels, _ = random_logits(7)
    ones = torch.ones(len(labels), 3)
    plain = cross_entropy_all_stages(logits, labels, trained)
    assert float(cross_entropy_all_stages(logits, labels, trained, ones)) == pytest.approx(
        float(plain), rel=1e-6
    )
    zero_last = ones.clone()
    zero_last[:, 2] = 0
    without_last = cross_entropy_all_stages(logits[:, :2], labels, trained and trained[:2])
    assert float(cross_entropy_all_stages(logits, labels, trained, zero_last)) == pytest.approx(
        float(without_last), rel=1e-6
    )


def test_a_zero_weight_sample_gives_the_gradient_of_the_batch_without_it():
    logits, labels, weights = random_logits(3)
    weights[4] = 0
    a = logits.clone().requires_grad_(True)
    cross_entropy_all_stages(a, labels, None, weights).backward()
    keep = torch.arange(len(labels)) != 4
    b = logits[keep].clone().requires_grad_(True)
    cross_entropy_all_stages(b, labels[keep], None, weights[keep]).backward()
    assert torch.allclose(a.grad[keep], b.grad, atol=1e-7)
    assert torch.equal(a.grad[4], torch.zeros_like(a.grad[4]))


def tiny_data(n: int = 96, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def trained_params(sample_weights, name: str = "digits") -> list[torch.Tensor]:
    with seeded(0):
        cascade = build_cascade(name, (1, 8, 8), 10)
        if sample_weights == "none-given":
            fit_classifiers(cascade, tiny_data(), 1, seed=0)
        else:
            fit_classifiers(cascade, tiny_data(), 1, seed=0, sample_weights=sample_weights)
    return [p.detach().clone() for p in cascade.parameters()]


@pytest.mark.parametrize("name", ["digits", "specialist"])
def test_no_weights_is_bit_identical_and_unit_weights_agree(name):
    k = 4 if name == "digits" else 3
    before = trained_params("none-given", name)
    assert all(torch.equal(a, b) for a, b in zip(before, trained_params(None, name), strict=True))
    ones = trained_params(torch.ones(96, k), name)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, ones, strict=True))


def test_bad_sample_weights_are_refused_with_their_name():
    cascade = build_cascade("digits", (1, 8, 8), 10)
    for bad in (torch.ones(95, 4), torch.ones(96, 3), -torch.ones(96, 4)):
        with pytest.raises(ValueError, match="sample_weights"):
            ClassifierFitting(cascade, tiny_data(), sample_weights=bad)
    with pytest.raises(TypeError, match="sample_weights"):
        ClassifierFitting(cascade, tiny_data(), sample_weights=[[1.0] * 4] * 96)


def test_exit_weights_by_hand():
    got = exit_weights(torch.tensor([0, 2, 1]), 3, floor=0.2, reach_share=0.5)
    expected = torch.tensor(
        [[1.0, 0.2, 0.2], [0.2 + 0.4, 0.2 + 0.4, 1.0], [0.2 + 0.4, 1.0, 0.2]]
    )  # answered: floor + 0.8; reached only: floor + 0.4; neither: floor
    assert torch.allclose(got, expected)


def test_defer_weights_by_hand():
    correct = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[3.0, 1.0, 1.0], [1.0, 3.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert torch.equal(defer_weights(correct, 2.0), expected)


@pytest.mark.parametrize("seed", range(20))
def test_cascade_aware_weights_match_their_definition(seed):
    correct = torch.rand(30, 4, generator=torch.Generator().manual_seed(seed)) > 0.5
    got = cascade_aware_weights(correct, 0.25)
    for i in range(30):
        for t in range(4):
            deferred = (not correct[i, t]) and bool(correct[i, t + 1 :].any())
            assert float(got[i, t]) == (0.25 if deferred else 1.0)


def test_config_checks_and_round_epochs():
    assert CascadeTraining(cascade_epochs=7, rounds=3).round_epochs() == [3, 2, 2]
    with pytest.raises(ValueError, match="weighting"):
        CascadeTraining(weighting="focal")
    with pytest.raises(ValueError, match="rounds"):
        CascadeTraining(cascade_epochs=2, rounds=3)
    with pytest.raises(ValueError, match="floor"):
        CascadeTraining(floor=1.5)
    with pytest.raises(ValueError, match="rule"):
        stage_weights(CascadeTraining(), torch.rand(4, 3, 5).softmax(-1), torch.zeros(4).long())


@pytest.mark.parametrize("weighting", ["plain", "exit", "defer", "cascade-aware"])
def test_train_for_cascade_spends_the_budget_and_keeps_the_best_validation_snapshot(
    weighting, monkeypatch
):
    epochs_run = []
    original = ClassifierFitting.run_epoch

    def counted(self):
        epochs_run.append(self.sample_weights is not None)
        original(self)

    monkeypatch.setattr(ClassifierFitting, "run_epoch", counted)
    train, val = tiny_data(96, 0), tiny_data(64, 1)
    config = CascadeTraining(weighting=weighting, cascade_epochs=3, rounds=2)
    with seeded(0):
        cascade = build_cascade("specialist", (1, 8, 8), 10)
        result = train_for_cascade(cascade, train, val, 5, config, seed=0)
    assert len(epochs_run) == 5  # 2 alone + 3 for the cascade: the reference's budget
    assert epochs_run[2:] == [weighting != "plain"] * 3
    # round 1: its start and epochs 1-2; round 2: its start (after epoch 2) and epoch 3
    assert [(h["round"], h["epoch"]) for h in result.history] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 3),
    ]
    assert not result.cascade.training
    if weighting == "plain":  # unweighted: each stage kept at its best validation accuracy
        last_round = [h["val_score"] for h in result.history if h["round"] == 2]
        final = weighted_stage_accuracy(split_outputs(result.cascade, val), None, TRAINED)
        for t in range(3):
            assert final[t] == max(score[t] for score in last_round)


def test_weighted_stage_accuracy_by_hand():
    probs = torch.tensor(
        [[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.6, 0.4]], [[0.6, 0.4], [0.1, 0.9]]]
    )  # argmax: stage 0 -> 0, 1, 0; stage 1 -> 1, 0, 1
    outputs = CascadeOutputs(probs, torch.tensor([0, 1, 1]), StageCosts([1, 2]))
    weights = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    assert weighted_stage_accuracy(outputs, weights, [None, None]) == [1.0, 2 / 3]
    assert weighted_stage_accuracy(outputs, None, [None, None]) == [2 / 3, 1 / 3]
    assert weighted_stage_accuracy(outputs, None, [None, frozenset({1})]) == [2 / 3, 0.5]


def test_validation_key_prefers_feasible_and_cheaper():
    probs = torch.rand(50, 3, 10, generator=torch.Generator().manual_seed(0)).softmax(-1)
    cascade = build_cascade("specialist", (1, 8, 8), 10)

    labels = probs[:, -1].argmax(-1)  # the last stage is always right
    outputs = CascadeOutputs(probs, labels, cascade.costs())
    feasible, neg_macs, accuracy = validation_key(outputs, 1.0)
    assert feasible == 1.0 and accuracy == 1.0
    assert -neg_macs <= cascade.costs().cumulative_macs[-1]
    assert validation_key(outputs, 1.01)[0] == 0.0


def test_keep_last_leaves_the_last_epochs_weights():
    train, val = tiny_data(96, 0), tiny_data(64, 1)
    config = CascadeTraining(weighting="plain", cascade_epochs=2, rounds=1, keep="last")
    with seeded(0):
        cascade = build_cascade("specialist", (1, 8, 8), 10)
        result = train_for_cascade(cascade, train, val, 3, config)
    final = weighted_stage_accuracy(split_outputs(result.cascade, val), None, TRAINED)
    assert final == result.history[-1]["val_score"]
    assert result.best_epoch == [2, 2, 2]
    with pytest.raises(ValueError, match="keep"):
        CascadeTraining(keep="first")
