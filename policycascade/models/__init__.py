"""Classifier families that make up cascades, by name."""

from __future__ import annotations

from collections.abc import Sequence

from policycascade.cascade import Cascade
from policycascade.models.digits import DIGITS_STAGE_NAMES, digits_classifiers


def build_cascade(name: str, input_shape: Sequence[int], num_classes: int) -> Cascade:
    """The cascade family called ``name`` for inputs of ``input_shape``."""
    if name == "digits":
        return Cascade(
            digits_classifiers(num_classes), input_shape, num_classes, DIGITS_STAGE_NAMES
        )
    raise ValueError(f"cascade must be one of ['digits'], got {name!r}")


CASCADES = ["digits"]

__all__ = ["CASCADES", "build_cascade", "digits_classifiers"]
