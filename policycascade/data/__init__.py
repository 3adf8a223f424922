"""Data sets by name, each as fixed train/validation/test splits."""

from __future__ import annotations

from pathlib import Path

from policycascade.data.digits import load_digits
from policycascade.data.label_noise import NOISY_ALL_DATASETS, NOISY_DATASETS, load_label_noise
from policycascade.data.specialist import load_specialist
from policycascade.data.splits import DataSplits, Split, stratified_split
from policycascade.data.synthetic import load_synthetic
from policycascade.data.vision import NORMALISATION, VISION_DATASETS, load_vision_dataset, to_float

# ImageNet (an ImageFolder tree) is read lazily by load_imagenet_folder, not held in memory.
LARGE_VALIDATION = {"synthetic-noisy-val10k": 10_000}  # synthetic-noisy with a larger val split
DATASETS = (
    "digits",
    "synthetic",
    "specialist",
    *NOISY_DATASETS,
    *NOISY_ALL_DATASETS,
    *LARGE_VALIDATION,
    *VISION_DATASETS,
)


def load_dataset(
    name: str, seed: int = 0, data_dir: str | Path = "data", download: bool = False
) -> DataSplits:
    """Load the data set called ``name`` with its validation split fixed by ``seed``."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "synthetic":
        return load_synthetic(seed=seed)
    if name == "specialist":
        return load_specialist(seed=seed)
    if name in NOISY_DATASETS:
        return load_label_noise(name.removesuffix("-noisy"), seed=seed)
    if name in NOISY_ALL_DATASETS:
        return load_label_noise(name.removesuffix("-noisy-all"), seed=seed, splits="all")
    if name in LARGE_VALIDATION:  # the same train and test, more (clean) validation samples
        noisy = load_label_noise("synthetic", seed=seed)
        val = load_synthetic(seed=seed, val_size=LARGE_VALIDATION[name]).val
        return DataSplits(name, noisy.train, val, noisy.test, noisy.num_classes)
    if name == "imagenet":
        raise ValueError(
            "dataset 'imagenet' (an ImageFolder tree) is read lazily with "
            "policycascade.data.vision.load_imagenet_folder; training on it is not supported "
            "here: use its config for --dry-run cost tables and compare pretrained cascades "
            "with policycascade.compare.compare_outputs"
        )
    if name in DATASETS:
        return load_vision_dataset(name, data_dir, seed=seed, download=download)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


__all__ = [
    "DATASETS",
    "NORMALISATION",
    "DataSplits",
    "Split",
    "load_dataset",
    "stratified_split",
    "to_float",
]
