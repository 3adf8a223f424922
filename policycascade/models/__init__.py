"""Classifier families that make up cascades, by name."""

from __future__ import annotations

from collections.abc import Sequence

from policycascade.cascade import Cascade
from policycascade.models.digits import DIGITS_STAGE_NAMES, digits_classifiers
from policycascade.models.paper import PAPER_CASCADES, cost_table
from policycascade.models.pretrained import pretrained_cascade, torchvision_classifier
from policycascade.models.specialist import SPECIALIST_STAGE_NAMES, specialist_classifiers

CASCADES = ["digits", "specialist", *PAPER_CASCADES]


def build_cascade(name: str, input_shape: Sequence[int], num_classes: int) -> Cascade:
    """The cascade family called ``name`` for inputs of ``input_shape`` (random init)."""
    if name == "digits":
        return Cascade(
            digits_classifiers(num_classes), input_shape, num_classes, DIGITS_STAGE_NAMES
        )
    if name == "specialist":
        return Cascade(
            specialist_classifiers(num_classes), input_shape, num_classes, SPECIALIST_STAGE_NAMES
        )
    if name in PAPER_CASCADES:
        spec = PAPER_CASCADES[name]
        if tuple(input_shape) != tuple(spec.input_shape):
            raise ValueError(
                f"cascade {name!r} takes inputs of shape {tuple(spec.input_shape)}, "
                f"but the data set has {tuple(input_shape)}"
            )
        return Cascade(spec.build(num_classes), input_shape, num_classes, spec.stage_names)
    raise ValueError(f"cascade must be one of {CASCADES}, got {name!r}")


__all__ = [
    "CASCADES",
    "PAPER_CASCADES",
    "build_cascade",
    "cost_table",
    "digits_classifiers",
    "pretrained_cascade",
    "torchvision_classifier",
]
