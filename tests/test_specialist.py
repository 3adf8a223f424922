"""The specialist data set and cascade, and the specialist's masked cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from policycascade.data import DATASETS, load_dataset
from policycascade.data.specialist import MARK, SPECIALTY_CLASSES, TWINS, specialist_templates
from policycascade.models import CASCADES, build_cascade
from policycascade.models.specialist import SpecialistClassifier
from policycascade.supervised import cross_entropy_all_stages, trained_classes_of


@pytest.fixture(scope="module")
def data():
    return load_dataset("specialist", seed=0)


def test_specialist_set_and_cascade_are_registered():
    assert "specialist" in DATASETS and "specialist" in CASCADES
    cascade = build_cascade("specialist", (1, 8, 8), 10)
    assert cascade.names == ["linear-4x4", "specialist-mlp-64", "cnn"]
    macs = cascade.classifier_macs()
    assert macs[0] < macs[1] < 0.05 * macs[2]  # the specialist is cheap next to the CNN


def test_dataset_shapes_and_class_balance(data):
    for split, size in (("train", 5000), ("val", 2000), ("test", 50000)):
        s = data.split(split)
        assert s.x.shape == (size, 1, 8, 8) and s.x.dtype == torch.float32
        assert s.y.dtype == torch.int64 and 0.0 <= float(s.x.min()) and float(s.x.max()) <= 1.0
    shares = torch.bincount(data.test.y, minlength=10).double() / len(data.test)
    assert torch.allclose(shares, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)


def test_dataset_is_deterministic_given_the_seed(data):
    again, other = load_dataset("specialist", seed=0), load_dataset("specialist", seed=1)
    assert torch.equal(data.train.x, again.train.x) and torch.equal(data.test.y, again.test.y)
    assert not torch.equal(data.train.x, other.train.x)


def test_twins_copy_their_original_but_for_the_corner_mark():
    templates = specialist_templates()
    for twin, original in TWINS.items():
        assert twin not in SPECIALTY_CLASSES and original in SPECIALTY_CLASSES
        assert (templates[twin, :2, :2] == MARK).all()
        assert (templates[twin, 2:] == templates[original, 2:]).all()
        assert (templates[twin, :2, 2:] == templates[original, :2, 2:]).all()


def test_the_specialist_stage_loss_ignores_samples_outside_its_classes():
    cascade = build_cascade("specialist", (1, 8, 8), 10)
    trained = trained_classes_of(cascade)
    assert trained == [None, frozenset(SPECIALTY_CLASSES), None]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 10, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, 8, 9, 7, 8])
    loss = cross_entropy_all_stages(logits, labels, trained)
    loss.backward()
    outside = torch.isin(labels, torch.tensor([8, 9]))
    # the specialist (stage 1) gets no gradient from classes 8 and 9, the generalists do
    assert (logits.grad[outside, 1] == 0).all()
    assert (logits.grad[~outside, 1] != 0).any(dim=-1).all()
    assert (logits.grad[:, [0, 2]] != 0).any(dim=-1).all()
    # by hand: each generalist's mean over all 6, the specialist's mean over its 3
    expected = (
        F.cross_entropy(logits[:, 0], labels)
        + F.cross_entropy(logits[~outside, 1], labels[~outside])
        + F.cross_entropy(logits[:, 2], labels)
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_a_batch_without_specialty_samples_adds_nothing_for_the_specialist():
    logits = torch.randn(2, 2, 10)
    labels = torch.tensor([8, 9])
    loss = cross_entropy_all_stages(logits, labels, [None, {0, 1}])
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits[:, 0], labels)))


def test_unmasked_loss_is_unchanged_and_bad_masks_are_errors():
    logits, labels = torch.randn(4, 3, 5), torch.tensor([0, 1, 2, 4])
    plain = cross_entropy_all_stages(logits, labels)
    assert torch.equal(cross_entropy_all_stages(logits, labels, [None, None, None]), plain)
    with pytest.raises(ValueError, match="one per stage"):
        cross_entropy_all_stages(logits, labels, [None, {0}])
    with pytest.raises(ValueError, match="trained_classes"):
        SpecialistClassifier(5, {7})
