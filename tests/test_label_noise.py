"""Built-in label-noise data sets: exact flips of the training labels, clean val and test."""

import pytest
import torch

from policycascade.config import TrainConfig
from policycascade.data import DATASETS, load_dataset
from policycascade.data.label_noise import (
    FLIPS,
    NOISE_SHARE,
    NOISY_DATASETS,
    flip_labels,
    load_label_noise,
)


def test_flips_change_exactly_the_share_of_each_noisy_class_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    for case in range(30):
        c = 3 + case % 5
        labels = torch.randint(c, (50 + 7 * case,), generator=g)
        source, target = case % c, (case + 1 + case % (c - 1)) % c
        share = [0.0, 0.25, 0.4, 0.5, 1.0][case % 5]
        noisy = flip_labels(labels, {source: target}, share, seed=case)
        changed = noisy != labels
        members = int((labels == source).sum())
        assert int(changed.sum()) == round(share * members)
        assert bool((labels[changed] == source).all()) and bool((noisy[changed] == target).all())
        assert noisy.dtype == labels.dtype
        # fixed by the seed, and another seed draws other samples (when there is a choice)
        assert torch.equal(noisy, flip_labels(labels, {source: target}, share, seed=case))
        if 0 < round(share * members) < members and members > 4:
            others = [flip_labels(labels, {source: target}, share, seed=s) for s in range(100, 105)]
            assert any(not torch.equal(noisy, o) for o in others)


@pytest.mark.parametrize("name", NOISY_DATASETS)
def test_noisy_sets_flip_only_training_labels_of_the_named_classes(name):
    base = name.removesuffix("-noisy")
    for seed in (0, 3):
        noisy, clean = load_dataset(name, seed), load_dataset(base, seed)
        assert noisy.name == name and name in DATASETS
        assert noisy.num_classes == clean.num_classes
        for split in ("val", "test"):
            assert torch.equal(noisy.split(split).x, clean.split(split).x)
            assert torch.equal(noisy.split(split).y, clean.split(split).y)
        assert torch.equal(noisy.train.x, clean.train.x)
        changed = noisy.train.y != clean.train.y
        for source, target in FLIPS.items():
            members = int((clean.train.y == source).sum())
            flipped = changed & (clean.train.y == source)
            assert int(flipped.sum()) == round(NOISE_SHARE * members)
            assert bool((noisy.train.y[flipped] == target).all())
        assert bool(torch.isin(clean.train.y[changed], torch.tensor(list(FLIPS))).all())


def test_the_noisy_sets_are_training_config_choices():
    for name in NOISY_DATASETS:
        assert TrainConfig(dataset=name).validate().dataset == name
    with pytest.raises(ValueError, match="dataset"):
        TrainConfig(dataset="digits-noisier").validate()


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda: load_label_noise("cifar10"), "base"),
        (lambda: load_label_noise("digits", share=1.5), "share"),
        (lambda: load_label_noise("digits", flips={2: 2}), "flips"),
        (lambda: load_label_noise("digits", flips={1: 10}), "flips"),
        (lambda: flip_labels(torch.tensor([0, 1]), {0: 1}, -0.1, 0), "share"),
    ],
)
def test_bad_label_noise_arguments_are_refused_by_name(call, named):
    with pytest.raises(ValueError, match=named):
        call()
