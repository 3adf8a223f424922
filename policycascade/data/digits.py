"""scikit-learn's bundled 8x8 handwritten digits: the embedded default, no download."""

from __future__ import annotations

import torch

from policycascade.data.splits import DataSplits, Split, stratified_split

VAL_FRACTION = 0.15
TEST_FRACTION = 0.25  # about 450 of the 1,797 images


def load_digits(seed: int = 0) -> DataSplits:
    """The digits as (sample, 1, 8, 8) images in [0, 1], split 60/15/25 stratified by ``seed``."""
    from sklearn.datasets import load_digits as sklearn_digits  # slow import: only when used

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train, val, test = stratified_split(bunch.target, VAL_FRACTION, TEST_FRACTION, seed)

    def take(idx) -> Split:
        return Split(images[idx], labels[idx])

    return DataSplits("digits", take(train), take(val), take(test), num_classes=10)
