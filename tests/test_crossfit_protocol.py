"""Cross-fitted outputs, per-classifier early stopping and the curve maths, on hand-made cases."""

import copy
import math

import pytest
import torch
from torch import nn

from policycascade.cascade import Cascade
from policycascade.crossfit import (
    cascade_fitter,
    cross_fitted_outputs,
    stage_accuracy,
    stratified_folds,
    train_reference,
)
from policycascade.data import Split
from policycascade.protocol import (
    macs_at_accuracy,
    macs_saved,
    mean_std,
    normalised_area,
    pareto_envelope,
)

C, K = 3, 2


def memorising_fit(seen_seeds=None):
    """fit() whose classifiers answer the stored label of any sample they trained on.

    Inputs are (n, 1) sample ids. A seen id gets a one-hot logit of 50 on its
    training label at every stage; an unseen one gets all-zero logits (uniform).
    """

    def fit(x_train, y_train, seed):
        if seen_seeds is not None:
            seen_seeds.append(seed)
        table = {int(i): int(label) for i, label in zip(x_train[:, 0], y_train, strict=True)}

        def predict(x):
            logits = torch.zeros(len(x), K, C)
            for row, sample_id in enumerate(x[:, 0].tolist()):
                if int(sample_id) in table:
                    logits[row, :, table[int(sample_id)]] = 50.0
            return logits

        return predict

    return fit


def id_data(n=60):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(n) % C
    return x, y


def test_cross_fitted_outputs_never_hold_the_memorised_answer():
    x, y = id_data()
    seeds = []
    probs = cross_fitted_outputs(memorising_fit(seeds), x, y, folds=5, seed=3)
    assert probs.shape == (60, K, C)
    # every row comes from classifiers that never saw its sample: uniform, never one-hot
    assert torch.allclose(probs, torch.full_like(probs, 1 / C))
    assert seeds == [15, 16, 17, 18, 19]  # seed * folds + fold
    # the same fit scored in-sample would memorise every answer
    in_sample = memorising_fit()(x, y, 0)(x).softmax(-1)
    assert (in_sample.argmax(-1) == y.unsqueeze(1)).all()


def test_folds_partition_the_samples_stratified_and_seeded():
    y = torch.tensor([0] * 10 + [1] * 15 + [2] * 20)
    folds = stratified_folds(y, 5, seed=0)
    every = torch.cat(folds)
    assert sorted(every.tolist()) == list(range(len(y)))  # disjoint and covering
    for held in folds:
        assert torch.bincount(y[held], minlength=3).tolist() == [2, 3, 4]
    again = stratified_folds(y, 5, seed=0)
    other = stratified_folds(y, 5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(folds, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folds, other, strict=True))


def test_too_few_samples_of_a_class_for_the_folds_is_an_error():
    with pytest.raises(ValueError, match="fewer folds"):
        stratified_folds(torch.tensor([0, 0, 0, 1, 1, 1, 2]), 3, seed=0)


def test_cascade_fitter_cross_fits_the_digits_cascade_deterministically():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(50, 1, 8, 8, generator=g), torch.arange(50) % 10
    fit = cascade_fitter("digits", (1, 8, 8), 10, epochs=1, batch_size=16)
    a = cross_fitted_outputs(fit, x, y, folds=2, seed=0)
    b = cross_fitted_outputs(fit, x, y, folds=2, seed=0)
    assert a.shape == (50, 4, 10)
    assert torch.allclose(a.sum(-1), torch.ones(50, 4))
    assert torch.equal(a, b)


def tiny_cascade(seed=0, d=30):
    torch.manual_seed(seed)
    return Cascade(
        [nn.Linear(d, 2), nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 2))], (d,), 2
    )


def overfitting_data(d=30):
    """40 training samples in 30 dimensions with 40% flipped labels; 400 clean val samples."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, generator=g)
    x_train, x_val = torch.randn(40, d, generator=g), torch.randn(400, d, generator=g)
    y_train = (x_train @ w > 0).long()
    flip = torch.rand(40, generator=g) < 0.4
    y_train = torch.where(flip, 1 - y_train, y_train)
    return Split(x_train, y_train), Split(x_val, (x_val @ w > 0).long())


def test_train_reference_keeps_each_classifiers_best_validation_epoch():
    train, val = overfitting_data()
    history, states = [], []

    def record(epoch, accuracy):
        history.append(accuracy)
        states.append(copy.deepcopy(cascade.state_dict()))

    cascade = tiny_cascade()
    train_reference(
        cascade,
        train,
        val,
        epochs=30,
        lr=0.03,
        batch_size=8,
        weight_decay=0.0,
        seed=0,
        on_epoch=record,
    )
    accuracy = torch.tensor(history, dtype=torch.float64)  # (epoch, stage)
    best = [int(torch.argmax(accuracy[:, t])) for t in range(K)]  # first maximum
    assert min(best) < len(history) - 1, "the set-up must over-fit: some peak before the end"
    assert stage_accuracy(cascade, val) == [float(accuracy[best[t], t]) for t in range(K)]
    for t in range(K):
        kept = cascade.classifiers[t].state_dict()
        at_peak = {
            k[len(f"classifiers.{t}.") :]: v
            for k, v in states[best[t]].items()
            if k.startswith(f"classifiers.{t}.")
        }
        assert all(torch.equal(kept[name], at_peak[name]) for name in kept)


def test_pareto_envelope_drops_dominated_points_and_sorts_by_macs():
    points = [(0.9, 50), (0.8, 10), (0.85, 60), (0.9, 70), (0.95, 100), (0.7, 20)]
    assert pareto_envelope(points) == [(0.8, 10), (0.9, 50), (0.95, 100)]
    assert pareto_envelope(torch.tensor([[0.5, 2.0], [0.5, 1.0]])) == [(0.5, 1.0)]


def test_macs_at_accuracy_interpolates_between_envelope_points():
    curve = [(0.8, 10), (0.9, 50), (0.95, 100), (0.85, 80)]  # (0.85, 80) is dominated
    assert macs_at_accuracy(curve, 0.85) == pytest.approx(30.0)  # halfway from 10 to 50
    assert macs_at_accuracy(curve, 0.9) == pytest.approx(50.0)
    assert macs_at_accuracy(curve, 0.94) == pytest.approx(90.0)
    assert macs_at_accuracy(curve, 0.5) == 10.0  # the cheapest point already reaches it
    assert macs_at_accuracy(curve, 0.96) is None  # unreachable


def test_macs_saved_relative_to_the_reference_curve():
    curve = [(0.8, 10), (0.9, 20)]
    reference = [(0.8, 10), (0.9, 50)]
    assert macs_saved(curve, reference, 0.9) == pytest.approx(1 - 20 / 50)
    assert macs_saved(curve, reference, 0.85) == pytest.approx(1 - 15 / 30)
    assert macs_saved(reference, curve, 0.9) == pytest.approx(1 - 50 / 20)
    assert macs_saved(curve, reference, 0.95) is None


def test_normalised_area_of_known_shapes():
    cheapest, oracle, top = (0.8, 10), (1.0, 100), 110
    # the cheapest point flat scores 0; the oracle accuracy flat over the range scores 1
    assert normalised_area([cheapest], cheapest, oracle, top) == pytest.approx(0.0)
    assert normalised_area([(1.0, 10)], cheapest, oracle, top) == pytest.approx(1.0)
    # one point (0.9, 60): linear -> 0.8..0.9 over [10, 60], then 0.9 flat to 110
    # area 50 * 0.85 + 50 * 0.9 = 87.5; (87.5 - 80) / 20 = 0.375; step: (40 + 45 - 80) / 20
    assert normalised_area([(0.9, 60)], cheapest, oracle, top) == pytest.approx(0.375)
    assert normalised_area([(0.9, 60)], cheapest, oracle, top, "step") == pytest.approx(0.25)
    # past max_macs the curve is cut off; the dominated (0.85, 90) changes nothing
    many = [(0.9, 60), (0.85, 90), (1.0, 200)]
    at_top = 0.9 + 0.1 * 50 / 140  # on the line from (0.9, 60) to (1.0, 200)
    expected = (50 * 0.85 + 50 * (0.9 + at_top) / 2 - 80) / 20
    assert normalised_area(many, cheapest, oracle, top) == pytest.approx(expected)


def test_mean_std_ignores_none_and_reports_n():
    result = mean_std([1.0, None, 3.0])
    assert result == (2.0, pytest.approx(math.sqrt(2.0)), 2)
    assert mean_std([None]).n == 0 and math.isnan(mean_std([]).mean)
    single = mean_std([4.0])
    assert single.mean == 4.0 and math.isnan(single.std) and single.n == 1
