import pytest
import torch

from conftest import random_outputs
from policycascade.agents.thresholds import ShiftedRule, ThresholdRule, ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.data import load_dataset
from policycascade.evaluation import evaluate_rule
from policycascade.models import build_cascade
from policycascade.shift import CORRUPTIONS, corrupt, refit_to_exit_shares, shift_report
from policycascade.supervised import fit_classifiers


@pytest.fixture(scope="module")
def digits():
    """The digits cascade after 2 epochs, its costs and data (a few seconds)."""
    torch.manual_seed(0)
    data = load_dataset("digits", 0)
    cascade = build_cascade("digits", data.input_shape, data.num_classes)
    fit_classifiers(cascade, data.train, epochs=2, seed=0)
    return cascade, cascade.costs(), data


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_grows_with_severity_and_stays_in_range(kind):
    x = _images()
    distances = [
        float((corrupt(x, kind, s, torch.Generator().manual_seed(1)) - x).abs().mean())
        for s in range(1, 6)
    ]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    out = corrupt(x * 2 - 1, kind, 5, torch.Generator().manual_seed(1), value_range=(-1, 1))
    assert out.min() >= -1 and out.max() <= 1 and out.dtype == x.dtype


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_is_determined_by_the_generator(kind):
    x = _images()
    a, b, c = (corrupt(x, kind, 3, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(a, c) == (kind != "noise")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_uint8_images_are_corrupted_as_their_float_copy(kind):
    x = (_images() * 255).round().to(torch.uint8)
    as_uint8 = corrupt(x, kind, 4, torch.Generator().manual_seed(2))
    as_float = corrupt(x.float() / 255, kind, 4, torch.Generator().manual_seed(2))
    assert as_uint8.dtype == torch.uint8
    assert (as_uint8.float() - as_float * 255).abs().max() <= 0.5 + 1e-4


def test_contrast_and_blur_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    torch.testing.assert_close(
        corrupt(x, "contrast", 3), torch.tensor([[[[0.3, 0.7], [0.3, 0.7]]]])
    )
    flat = torch.full((1, 2, 5, 5), 0.25)
    torch.testing.assert_close(corrupt(flat, "blur", 5), flat)  # blur keeps a constant image


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fog", "severity": 1}, "kind"),
        ({"kind": "noise", "severity": 0}, "severity"),
        ({"kind": "noise", "severity": 2.5}, "severity"),
    ],
)
def test_bad_corruption_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        corrupt(_images(), **kwargs)


def test_strong_contrast_loss_makes_every_digits_classifier_worse(digits):
    cascade, costs, data = digits
    clean = cascade.outputs(data.test.x, data.test.y, costs)
    accuracies = []
    for severity in (1, 3, 5):
        shifted = cascade.outputs(corrupt(data.test.x, "contrast", severity), data.test.y, costs)
        accuracies.append(evaluate_rule(ThresholdRule("max-softmax", [1.1] * 3), shifted))
    clean_acc = evaluate_rule(ThresholdRule("max-softmax", [1.1] * 3), clean)["stage_accuracy"]
    worst = accuracies[-1]["stage_accuracy"]
    assert all(w < c for w, c in zip(worst, clean_acc, strict=True)), (worst, clean_acc)
    means = [sum(a["stage_accuracy"]) / 4 for a in accuracies]
    assert means[0] > means[1] > means[2]

    val = cascade.outputs(data.val.x, data.val.y, costs)
    rule = ThresholdSearch(val.probs, val.labels, val.costs).for_accuracy_drop(0.05)
    report = shift_report(
        rule, val, clean, cascade.outputs(corrupt(data.test.x, "contrast", 3), data.test.y, costs)
    )
    assert report.accuracy_lost > 0
    assert report.exit_drift_tv == pytest.approx(0.5 * sum(map(abs, report.exit_share_drift)))
    assert report.as_dict()["accuracy_lost"] == report.accuracy_lost


def test_refit_recovers_the_clean_exit_shares_on_shifted_data_without_labels(digits):
    cascade, costs, data = digits
    val = cascade.outputs(data.val.x, data.val.y, costs)
    rule = ThresholdSearch(val.probs, val.labels, val.costs).for_accuracy_drop(0.05)
    target = evaluate_rule(rule, val)["exit_distribution"]
    g = torch.Generator().manual_seed(0)
    shifted_val, shifted_test = (
        cascade.outputs(corrupt(s.x, "blur", 3, g), s.y, costs) for s in (data.val, data.test)
    )
    before = evaluate_rule(rule, shifted_test)["exit_distribution"]
    unlabelled = shifted_val.probs  # labels are never read
    refit = refit_to_exit_shares(rule, unlabelled, target)
    assert isinstance(refit, ThresholdRule) and refit.criterion == rule.criterion
    on_val = evaluate_rule(refit, shifted_val)["exit_distribution"]
    on_test = evaluate_rule(refit, shifted_test)["exit_distribution"]
    n = shifted_val.num_samples
    assert on_val == pytest.approx(target, abs=1.5 / n)  # exact up to rounding on its own data
    drift_before = max(abs(b - t) for b, t in zip(before, target, strict=True))
    drift_after = max(abs(a - t) for a, t in zip(on_test, target, strict=True))
    assert drift_after < 0.06 and drift_after < drift_before


def test_refit_of_any_rule_shifts_its_scores():
    out = random_outputs(500, 3, 4, seed=3)
    base = ThresholdRule("entropy", [-0.5, -0.8])
    target = [0.2, 0.3, 0.5]
    for rule in (base, ShiftedRule(base, [0.1, 0.1])):
        refit = refit_to_exit_shares(rule, out.probs, target)
        shares = evaluate_rule(refit, out)["exit_distribution"]
        assert shares == pytest.approx(target, abs=1 / 500)
    wrapped = refit_to_exit_shares(ShiftedRule(base, [0.0, 0.0]), out.probs, target)
    assert isinstance(wrapped, ShiftedRule) and wrapped.base is base
    with pytest.raises(ValueError, match="target_exit_shares"):
        refit_to_exit_shares(base, out.probs, [0.5, 0.5])


def test_shift_report_needs_the_same_samples():
    out = random_outputs(50, 3, 4)
    half = CascadeOutputs(out.probs[:10], out.labels[:10], out.costs)
    with pytest.raises(ValueError, match="same 50 samples"):
        shift_report(ThresholdRule("max-softmax", [0.5, 0.5]), out, out, half)
