"""Label noise in every split (``*-noisy-all``): exact flips per split, independent draws."""

import re

import numpy as np
import pytest
import torch

from policycascade.config import TrainConfig
from policycascade.data import DATASETS, load_dataset
from policycascade.data.label_noise import (
    FLIPS,
    NOISE_SHARE,
    NOISE_STREAM,
    NOISY_ALL_DATASETS,
    SPLIT_STREAMS,
    flip_labels,
    load_label_noise,
)

SPLITS = ("train", "val", "test")


def _flipped(noisy: torch.Tensor, clean: torch.Tensor, source: int) -> set[int]:
    """Indices of the samples of class ``source`` whose label was changed."""
    return set(torch.nonzero((noisy != clean) & (clean == source)).flatten().tolist())


def _train_only_as_before(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The train-only flips as written before splits= existed (one stream, sorted classes)."""
    rng = np.random.default_rng([seed, 0x1AB3])
    out = labels.numpy().copy()
    for source in sorted(FLIPS):
        members = np.flatnonzero(labels.numpy() == source)
        out[rng.choice(members, size=int(round(NOISE_SHARE * len(members))), replace=False)] = (
            FLIPS[source]
        )
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", NOISY_ALL_DATASETS)
def test_every_split_has_exactly_the_share_of_each_noisy_class_flipped(name):
    base = name.removesuffix("-noisy-all")
    for seed in (0, 2):
        noisy, clean = load_dataset(name, seed), load_dataset(base, seed)
        assert noisy.name == name and name in DATASETS
        assert noisy.num_classes == clean.num_classes
        for split in SPLITS:
            n, c = noisy.split(split), clean.split(split)
            assert torch.equal(n.x, c.x) and n.y.dtype == c.y.dtype
            changed = n.y != c.y
            for source, target in FLIPS.items():
                members = int((c.y == source).sum())
                flipped = changed & (c.y == source)
                assert members > 0 and int(flipped.sum()) == round(NOISE_SHARE * members)
                assert bool((n.y[flipped] == target).all())
            # nothing outside the noisy classes moves
            assert int(changed.sum()) == sum(
                round(NOISE_SHARE * int((c.y == s).sum())) for s in FLIPS
            )
            assert torch.equal(n.y[~changed], c.y[~changed])


@pytest.mark.parametrize("name", NOISY_ALL_DATASETS)
def test_each_split_is_its_own_seed_fixed_draw_and_train_is_the_train_only_draw(name):
    base = name.removesuffix("-noisy-all")
    for seed in (0, 3):
        noisy, again = load_dataset(name, seed), load_dataset(name, seed)
        clean, train_only = load_dataset(base, seed), load_dataset(f"{base}-noisy", seed)
        # the train-only variant is unchanged, and shares its training flips with this one
        assert torch.equal(train_only.train.y, _train_only_as_before(clean.train.y, seed))
        assert torch.equal(noisy.train.y, train_only.train.y)
        for split in ("val", "test"):
            assert torch.equal(train_only.split(split).y, clean.split(split).y)
        for split in SPLITS:
            assert torch.equal(noisy.split(split).y, again.split(split).y)  # fixed by the seed
            expected = flip_labels(
                clean.split(split).y, FLIPS, NOISE_SHARE, seed, stream=SPLIT_STREAMS[split]
            )
            assert torch.equal(noisy.split(split).y, expected)


def test_the_split_streams_draw_independently_of_each_other_and_of_the_seed():
    assert SPLIT_STREAMS["train"] == NOISE_STREAM and len(set(SPLIT_STREAMS.values())) == 3
    g = torch.Generator().manual_seed(1)
    for case in range(20):
        # the same labels in every split: independent draws pick different samples
        labels = torch.randint(10, (400 + 13 * case,), generator=g)
        picks = {
            split: {
                s: _flipped(flip_labels(labels, FLIPS, NOISE_SHARE, case, stream=k), labels, s)
                for s in FLIPS
            }
            for split, k in SPLIT_STREAMS.items()
        }
        for s in FLIPS:
            sets = [picks[split][s] for split in SPLITS]
            assert all(len(p) == round(NOISE_SHARE * int((labels == s).sum())) for p in sets)
            assert sets[0] != sets[1] and sets[0] != sets[2] and sets[1] != sets[2]
            # overlap near share * size, as for independent draws (never all or nothing)
            members = int((labels == s).sum())
            for a, b in ((0, 1), (0, 2), (1, 2)):
                overlap = len(sets[a] & sets[b])
                assert 0 < overlap < len(sets[a])
                assert abs(overlap - NOISE_SHARE**2 * members) < 0.2 * members
        # another seed, same stream: other samples
        other = flip_labels(labels, FLIPS, NOISE_SHARE, case + 100, stream=SPLIT_STREAMS["val"])
        assert _flipped(other, labels, 1) != picks["val"][1]


def test_the_all_splits_sets_are_training_config_choices():
    for name in NOISY_ALL_DATASETS:
        assert TrainConfig(dataset=name).validate().dataset == name


@pytest.mark.parametrize("splits", ["val", "test", "ALL", "", "train+val"])
def test_a_bad_splits_value_is_refused_by_name(splits):
    with pytest.raises(ValueError, match=f"splits.*{re.escape(repr(splits))}"):
        load_label_noise("digits", splits=splits)


def test_the_larger_validation_split_adds_samples_and_changes_nothing_else():
    from policycascade.data.synthetic import load_synthetic

    big, plain = load_dataset("synthetic-noisy-val10k", 1), load_dataset("synthetic-noisy", 1)
    assert big.name == "synthetic-noisy-val10k" and "synthetic-noisy-val10k" in DATASETS
    assert len(big.val.y) == 10_000 and big.val.x.shape[1:] == plain.val.x.shape[1:]
    for split in ("train", "test"):  # the same (noisy) training labels and test split
        assert torch.equal(big.split(split).x, plain.split(split).x)
        assert torch.equal(big.split(split).y, plain.split(split).y)
    assert torch.equal(big.val.x[:2000], plain.val.x) and torch.equal(big.val.y[:2000], plain.val.y)
    again, other = load_synthetic(1, val_size=10_000), load_synthetic(2, val_size=10_000)
    assert torch.equal(again.val.x, big.val.x)  # the added samples are fixed by the seed
    assert not torch.equal(other.val.x[2000:], big.val.x[2000:])
    for bad in (1999, 2500.0, True, "10000", None):
        with pytest.raises(ValueError, match=f"val_size must be an integer >= 2000, got {bad!r}"):
            load_synthetic(0, val_size=bad)


def test_the_config_layer_knows_every_embedded_data_set():
    """config_unread keeps its own list (it imports no data loaders): it must match."""
    from policycascade.config_unread import EMBEDDED_DATASETS
    from policycascade.data.vision import VISION_DATASETS

    assert set(EMBEDDED_DATASETS) == set(DATASETS) - set(VISION_DATASETS)
