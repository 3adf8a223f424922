"""The specialist cascade: a cheap generalist, a specialist trained on eight classes, a CNN."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from policycascade.data.specialist import SPECIALTY_CLASSES
from policycascade.models.digits import digits_classifiers

SPECIALIST_STAGE_NAMES = ["linear-4x4", "specialist-mlp-64", "cnn"]


class SpecialistClassifier(nn.Sequential):
    """An MLP on the full 8x8 image whose loss counts only samples of ``trained_classes``.

    It keeps all C outputs, but :func:`policycascade.supervised.cross_entropy_all_stages`
    masks every other sample out of its loss (callers pass the classifiers'
    ``trained_classes``, as :func:`policycascade.supervised.fit_classifiers` does),
    so on other classes it answers confidently with one of its own.
    """

    def __init__(self, num_classes: int, trained_classes: Collection[int], hidden: int = 64):
        super().__init__(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        if not trained_classes or not all(0 <= c < num_classes for c in trained_classes):
            raise ValueError(
                f"trained_classes must be a non-empty set of classes in [0, {num_classes}), "
                f"got {trained_classes!r}"
            )
        self.trained_classes = frozenset(int(c) for c in trained_classes)


def specialist_classifiers(num_classes: int = 10) -> list[nn.Module]:
    """Three classifiers for (batch, 1, 8, 8) inputs: 160, 4.7K and 152K MACs.

    The digits cascade's pooled linear model and CNN around a specialist MLP
    trained on :data:`~policycascade.data.specialist.SPECIALTY_CLASSES` only; the
    specialist costs about 3% of the CNN, so stopping there pays when it is right.
    """
    linear, *_, cnn = digits_classifiers(num_classes)
    return [linear, SpecialistClassifier(num_classes, SPECIALTY_CLASSES), cnn]
