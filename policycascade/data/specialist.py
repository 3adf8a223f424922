"""A generated data set on which a specialist stage's max-softmax misleads its stopping rule.

Jitkrittum et al. (NeurIPS 2023, "When does confidence-based cascade deferral
suffice?") show that deferring on max-softmax is optimal only when a model's
confidence ranks samples the way the next model's gain does, and fails when a
model is a *specialist*. This set is built so that the specialist stage of the
``"specialist"`` cascade (:mod:`policycascade.models.specialist`) is confidently
wrong on a known share of samples, and its predicted class says which.

Ten classes of (1, 8, 8) images made like :mod:`policycascade.data.synthetic`'s
(blob templates, easy samples with small noise, ``hard_fraction`` of blended,
shifted, noisier ones). Classes 0-7 have their own random templates. Classes 8
and 9 are *twins* of 0 and 1: the same template with a 2x2 checkerboard
(1, 0 / 0, 1) written over its top-left corner. The specialist, trained on
classes 0-7 only, has never seen the mark and answers a twin with its
original's class as confidently as the original; a generalist that saw every
class learns the mark. So the specialist is right on 80% of samples and
confidently wrong on the rest, which all land on its predictions 0 and 1: its
predicted class tells a rule when to trust it, its max-softmax does not.
"""

from __future__ import annotations

import numpy as np

from policycascade.data.splits import DataSplits
from policycascade.data.synthetic import _templates, splits_from_templates

SPECIALTY_CLASSES = tuple(range(8))  # what the specialist stage is trained on
TWINS = {8: 0, 9: 1}  # twin class -> the specialty class whose template it copies
MARK = np.array([[1.0, 0.0], [0.0, 1.0]])  # written over the top-left 2x2 corner


def specialist_templates(template_seed: int = 1234) -> np.ndarray:
    """The ten (8, 8) class templates: eight random ones, then the marked twins of 0 and 1."""
    templates = _templates(np.random.default_rng(template_seed))
    for twin, original in TWINS.items():
        templates[twin] = templates[original]
        templates[twin, :2, :2] = MARK
    return templates


def load_specialist(
    seed: int = 0, hard_fraction: float = 0.3, template_seed: int = 1234
) -> DataSplits:
    """Specialist-twin (sample, 1, 8, 8) images in [0, 1]: 5,000 train, 2,000 val, 50,000 test.

    Labels are uniform over the ten classes. The templates are fixed by
    ``template_seed`` (the same task for every seed); ``seed`` draws the samples.
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    templates = specialist_templates(template_seed)
    return splits_from_templates("specialist", templates, seed, hard_fraction)
