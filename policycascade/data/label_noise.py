"""Built-in data sets with noisy training labels on two classes: confidence misleads there.

Jitkrittum et al. (NeurIPS 2023, "When does confidence-based cascade deferral
suffice?") name label noise as a setting where deferring on confidence fails: every
stage learns the same noise, so a stage's confidence on the noisy classes is low
whether or not a later stage would do better, and a confidence threshold sends those
samples on for nothing. Here a fixed share of the *training* labels of the classes in
``FLIPS`` is replaced by a fixed other class; validation and test labels stay clean, so
the stopping rule is fitted and measured against the truth. With a share below one half
the stages still answer the true class, at a confidence near ``1 - share``; above it they
answer the flip target, confidently and wrongly.

``"digits-noisy"`` and ``"synthetic-noisy"`` are the digits and synthetic sets with 40% of
the training labels of classes 1 and 3 flipped to 7 and 8, chosen by the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from policycascade.data.digits import load_digits
from policycascade.data.splits import DataSplits, Split
from policycascade.data.synthetic import load_synthetic

FLIPS = {1: 7, 3: 8}  # noisy class -> the class its flipped training labels become
NOISE_SHARE = 0.4  # share of each noisy class's training labels that is flipped
NOISE_STREAM = 0x1AB3  # mixed into the seed, so the flips do not reuse the data's draws
BASES: dict[str, Callable[[int], DataSplits]] = {"digits": load_digits, "synthetic": load_synthetic}
NOISY_DATASETS = tuple(f"{base}-noisy" for base in BASES)


def flip_labels(
    labels: torch.Tensor, flips: Mapping[int, int], share: float, seed: int
) -> torch.Tensor:
    """A copy of ``labels`` with ``round(share * n_c)`` labels of each class c in ``flips`` changed.

    The flipped samples of class c are drawn without replacement, fixed by ``seed``,
    and get label ``flips[c]``; every other label is kept.
    """
    if not (isinstance(share, int | float) and 0.0 <= share <= 1.0):
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    for source, target in flips.items():
        if source == target:
            raise ValueError(f"flips must send a class to another class, got {source}: {target}")
    rng = np.random.default_rng([seed, NOISE_STREAM])
    original = labels.numpy()
    noisy = original.copy()
    for source in sorted(flips):
        members = np.flatnonzero(original == source)
        chosen = rng.choice(members, size=int(round(share * len(members))), replace=False)
        noisy[chosen] = flips[source]
    return torch.from_numpy(noisy).to(labels.dtype)


def load_label_noise(
    base: str, seed: int = 0, share: float = NOISE_SHARE, flips: Mapping[int, int] = FLIPS
) -> DataSplits:
    """Data set ``base`` (digits or synthetic) with its training labels flipped per ``flips``.

    The inputs and the validation and test splits are ``base``'s for ``seed``; the set
    is named ``f"{base}-noisy"``.
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
    data = BASES[base](seed)
    for c in (*flips, *flips.values()):
        if not (isinstance(c, int) and 0 <= c < data.num_classes):
            raise ValueError(f"flips must name classes 0..{data.num_classes - 1}, got {c!r}")
    train = Split(data.train.x, flip_labels(data.train.y, flips, share, seed))
    return DataSplits(f"{base}-noisy", train, data.val, data.test, data.num_classes)
