"""Labelled tensors and the fixed train/validation/test split every run uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """One labelled split: inputs (sample, ...) and int64 labels (sample,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    """Train, validation and test splits of one data set, plus what models need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.train.x.shape[1:])

    def split(self, name: str) -> Split:
        """The split called ``name`` (train, val or test)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be one of train, val, test; got {name!r}")
        return getattr(self, name)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test partition, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split  # slow import: only when splitting

    indices = np.arange(len(labels))
    rest, test = train_test_split(
        indices, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=labels[rest],
        random_state=seed,
    )
    return np.sort(train), np.sort(val), np.sort(test)
