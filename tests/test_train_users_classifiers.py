"""Users' own modules trained for the cascade: ``train_policy(..., train_classifiers=True)``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import policycascade
from policycascade.config import ConfigError, config_from_dict
from policycascade.data import load_dataset


def _modules() -> list[nn.Module]:
    torch.manual_seed(0)
    small = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    big = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return [small, big]


def _splits(data, with_fit: bool = True) -> dict:
    splits = {"val": (data.val.x, data.val.y), "test": (data.test.x, data.test.y)}
    if with_fit:
        splits["fit"] = (data.train.x, data.train.y)
    return splits


def _accuracy(module: nn.Module, split) -> float:
    with torch.no_grad():
        return (module(split.x).argmax(-1) == split.y).double().mean().item()


def test_untrained_modules_are_trained_as_copies_and_stay_untouched(tmp_path):
    data = load_dataset("digits", seed=0)
    modules = _modules()
    before = [copy.deepcopy(m.state_dict()) for m in modules]
    env_id = policycascade.register_cascade("UntrainedPair", modules, splits=_splits(data))
    run = policycascade.train_policy(
        env_id,
        alpha=1e-2,
        logdir=tmp_path / "runs",
        train_classifiers=True,
        classifier_epochs=3,
        folds=2,
    )
    assert run.finished and run.rule is not None
    # the user's modules: same weights, still untrained
    for module, state in zip(modules, before, strict=True):
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    untrained = [_accuracy(m, data.test) for m in modules]
    trained = [s["accuracy"] for s in run.metrics["single_classifiers"]]
    assert all(t > u + 0.2 for t, u in zip(trained, untrained, strict=True)), (trained, untrained)
    # the run's copies are the ones that were trained
    for copied, original in zip(run.cascade.classifiers, modules, strict=True):
        assert not torch.equal(copied[-1].weight.cpu(), original[-1].weight)


def test_training_copies_needs_a_fit_split(tmp_path):
    data = load_dataset("digits", seed=0)
    env_id = policycascade.register_cascade(
        "NoFitSplit", _modules(), splits=_splits(data, with_fit=False)
    )
    with pytest.raises(ValueError, match="'fit' split"):
        policycascade.train_policy(env_id, logdir=tmp_path / "runs", train_classifiers=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_train_classifiers_is_refused_without_env_and_opens_the_training_options():
    with pytest.raises(ConfigError, match="train_classifiers"):
        config_from_dict({"continuation": {"train_classifiers": True}})
    with pytest.raises(ConfigError, match="optimizer='sgd' would be ignored"):
        config_from_dict({"env": "m:policycascade/Mine-v0", "optimizer": "sgd"})
    config = config_from_dict(
        {
            "env": "m:policycascade/Mine-v0",
            "optimizer": "sgd",
            "continuation": {"train_classifiers": True},
        }
    )
    assert config.optimizer == "sgd" and config.continuation.train_classifiers
    with pytest.raises(ConfigError, match="dataset"):
        config_from_dict(
            {
                "env": "m:policycascade/Mine-v0",
                "dataset": "synthetic",
                "continuation": {"train_classifiers": True},
            }
        )
