"""Data sets by name, each as fixed train/validation/test splits."""

from policycascade.data.digits import load_digits
from policycascade.data.splits import DataSplits, Split, stratified_split
from policycascade.data.synthetic import load_synthetic

DATASETS = {"digits": load_digits, "synthetic": load_synthetic}


def load_dataset(name: str, seed: int = 0) -> DataSplits:
    """Load the data set called ``name`` with its split fixed by ``seed``."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](seed=seed)


__all__ = ["DATASETS", "DataSplits", "Split", "load_dataset", "stratified_split"]
