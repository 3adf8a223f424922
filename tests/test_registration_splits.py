"""``register_cascade(..., splits=...)``: one id, the splits a policy needs, outputs cached.

The cascades are linear classifiers that count the samples they see, so "computed once,
lazily, per split" is checked by counting, and the cached outputs are checked against
the classifiers' softmaxes computed here.
"""

import itertools
import warnings

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn

from policycascade.cascade import CascadeOutputs
from policycascade.envs import (
    DIGITS_ID,
    SPLIT_NAMES,
    CascadeStoppingEnv,
    CascadeStoppingVectorEnv,
    RegisteredCascade,
    register_cascade,
    registered_cascade,
)

_names = itertools.count()


class Counting(nn.Linear):
    """A linear classifier that counts the samples it has been run on."""

    def __init__(self, features: int, classes: int):
        super().__init__(features, classes)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


SPLITS = {"fit": data(30, 1), "val": data(20, 2), "test": data(12, 3)}


def register(splits, classifiers=None, **kwargs):
    torch.manual_seed(0)
    classifiers = classifiers or [Counting(5, 4), Counting(5, 4)]
    env_id = register_cascade(f"Splits{next(_names)}", classifiers, splits=splits, **kwargs)
    return env_id, classifiers


def seen_since(classifiers, before):
    return [clf.seen - b for clf, b in zip(classifiers, before, strict=True)]


def test_make_samples_the_split_asked_for():
    env_id, _ = register(SPLITS)
    for split, (x, _) in SPLITS.items():
        env = gym.make(env_id, split=split)
        assert env.unwrapped.num_samples == len(x)
        vec = gym.make_vec(env_id, num_envs=3, split=split, device="cpu")
        assert vec.unwrapped.num_samples == len(x)
    assert gym.make(env_id).unwrapped.num_samples == 30  # default: the first split, fit


def test_cached_outputs_are_the_classifiers_softmaxes_on_that_split():
    env_id, classifiers = register(SPLITS)
    registered = registered_cascade(env_id)
    assert isinstance(registered, RegisteredCascade)
    assert registered.split_names == SPLIT_NAMES and not registered.single_split
    x, y = SPLITS["test"]
    outputs = registered.outputs("test")
    assert isinstance(outputs, CascadeOutputs)
    with torch.no_grad():
        expected = torch.stack([clf(x).softmax(-1) for clf in classifiers], dim=1)
    torch.testing.assert_close(outputs.probs, expected)
    assert torch.equal(outputs.labels, y)
    assert registered.data("test")[0] is x
    env = gym.make(env_id, split="test").unwrapped
    obs, info = env.reset(options={"sample_index": 7})
    torch.testing.assert_close(torch.from_numpy(obs[:4]), expected[7, 0])


def test_outputs_are_computed_lazily_once_per_split():
    env_id, classifiers = register(SPLITS)
    registered = registered_cascade(env_id)
    before = [clf.seen for clf in classifiers]
    for _ in range(2):
        gym.make(env_id, split="val")
        gym.make_vec(env_id, num_envs=2, split="val", device="cpu")
        registered.outputs("val")
    assert seen_since(classifiers, before) == [20, 20]  # val once; fit and test not yet
    registered.outputs("test")
    assert seen_since(classifiers, before) == [32, 32]


def test_val_and_test_only_and_an_unregistered_split_is_named():
    env_id, classifiers = register({"val": SPLITS["val"], "test": SPLITS["test"]})
    registered = registered_cascade(env_id)
    assert registered.split_names == ("val", "test") and registered.default_split == "val"
    before = [clf.seen for clf in classifiers]
    for make in (
        lambda: gym.make(env_id, split="fit"),
        lambda: gym.make_vec(env_id, num_envs=2, split="fit"),
        lambda: registered.outputs("fit"),
    ):
        with pytest.raises(ValueError) as raised:
            make()
        for fragment in ("split", "['val', 'test']", env_id, "'fit'"):
            assert fragment in str(raised.value)
    assert seen_since(classifiers, before) == [0, 0]  # rejected before any output


def test_one_split_form_serves_every_split_name_from_one_computation():
    x, y = SPLITS["val"]
    torch.manual_seed(0)
    classifiers = [Counting(5, 4), Counting(5, 4)]
    env_id = register_cascade(f"OneSplit{next(_names)}", classifiers, x, y)
    registered = registered_cascade(env_id)
    assert registered.single_split and registered.split_names == SPLIT_NAMES
    before = [clf.seen for clf in classifiers]
    first = registered.outputs("fit")
    for split in SPLIT_NAMES:
        assert registered.outputs(split) is first
        assert gym.make(env_id, split=split).unwrapped.num_samples == 20
    assert seen_since(classifiers, before) == [20, 20]
    with pytest.raises(ValueError, match="'tset'"):
        gym.make(env_id, split="tset")


def test_registered_split_env_passes_the_env_checker():
    env_id, _ = register({"val": SPLITS["val"], "test": SPLITS["test"]})
    env = gym.make(env_id, split="test", alpha=0.01)
    assert isinstance(env.unwrapped, CascadeStoppingEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    vec = gym.make_vec(env_id, num_envs=4, split="test", device="cpu")
    assert isinstance(vec.unwrapped, CascadeStoppingVectorEnv)


def test_same_splits_again_is_idempotent_and_other_splits_need_overwrite():
    torch.manual_seed(0)
    classifiers, name = [Counting(5, 4), Counting(5, 4)], f"Again{next(_names)}"
    env_id = register_cascade(name, classifiers, splits=SPLITS)
    assert register_cascade(name, classifiers, splits=dict(SPLITS)) == env_id
    with pytest.raises(ValueError, match="different splits"):
        register_cascade(name, classifiers, splits={"test": SPLITS["test"]})
    with pytest.raises(ValueError, match="different splits"):
        register_cascade(name, classifiers, *SPLITS["val"])
    other = {**SPLITS, "test": data(12, 4)}
    with pytest.raises(ValueError, match="different data"):
        register_cascade(name, classifiers, splits=other)
    register_cascade(name, classifiers, splits=other, overwrite=True)
    assert torch.equal(registered_cascade(env_id).data("test")[0], other["test"][0])


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"x": SPLITS["val"][0], "y": SPLITS["val"][1], "splits": SPLITS}, ValueError, ["both"]),
        ({}, ValueError, ["x and y", "splits="]),
        ({"x": SPLITS["val"][0]}, ValueError, ["x and y"]),
        ({"splits": {}}, TypeError, ["splits", "non-empty"]),
        ({"splits": [SPLITS["val"]]}, TypeError, ["splits", "dict"]),
        ({"splits": {"train": SPLITS["val"]}}, ValueError, ["'train'", "['fit', 'val', 'test']"]),
        ({"splits": {"val": SPLITS["val"][0]}}, TypeError, ["splits['val']", "pair (x, y)"]),
        (
            {"splits": {"val": SPLITS["val"], "test": (torch.randn(12, 6), SPLITS["test"][1])}},
            ValueError,
            ["splits['test']", "(6,)", "(5,)"],
        ),
        (
            {"splits": {"val": SPLITS["val"], "test": (SPLITS["test"][0], SPLITS["test"][1][:3])}},
            ValueError,
            ["splits['test']: x and y", "12 and 3"],
        ),
        (
            {"splits": {"val": SPLITS["val"], "test": (torch.randn(2, 5), torch.tensor([0, 9]))}},
            ValueError,
            ["splits['test']: y", "num_classes=4", "0 to 9"],
        ),
        (
            {"splits": {"val": (SPLITS["val"][0], torch.eye(4)[SPLITS["val"][1]])}},
            ValueError,
            ["splits['val']: y must be integer class indices", "float one-hot", "y.argmax(1)"],
        ),
        (
            {"splits": {"val": (SPLITS["val"][0][:0], SPLITS["val"][1][:0])}},
            ValueError,
            ["splits['val']", "at least one sample"],
        ),
    ],
    ids=[
        "both",
        "none",
        "x-only",
        "empty",
        "list",
        "train",
        "not-a-pair",
        "sample-shapes",
        "lengths",
        "labels",
        "one-hot",
        "empty-split",
    ],
)
def test_bad_splits_are_named(kwargs, error, fragments):
    with pytest.raises(error) as raised:
        register_cascade(f"BadSplits{next(_names)}", [Counting(5, 4), Counting(5, 4)], **kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from {raised.value!r}"


def test_registered_cascade_lookup():
    env_id, _ = register(SPLITS)
    assert registered_cascade(f"policycascade:{env_id}") is registered_cascade(env_id)
    with pytest.raises(ValueError, match="not registered with register_cascade") as raised:
        registered_cascade("policycascade/Nothing-v0")
    assert env_id in str(raised.value)  # the ids that are registered
    with pytest.raises(ValueError, match="digits_outputs"):
        registered_cascade(DIGITS_ID)
    with pytest.raises(TypeError, match="env_id"):
        registered_cascade(None)
