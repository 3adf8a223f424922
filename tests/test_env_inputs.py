"""The environments' inputs: every bad one is a ValueError/TypeError naming the argument and value.

Classifiers and data are checked where they enter (``register_cascade``), numbers are
numbers (no booleans, no silently truncated fractions), and the single and vector
environments agree.
"""

import itertools
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from torch import nn

import policycascade.supervised
from conftest import hand_outputs
from policycascade.envs import (
    DIGITS_ID,
    STOP,
    CascadeStoppingEnv,
    CascadeStoppingVectorEnv,
    register_cascade,
    registered_cascade,
)

_names = itertools.count()
X, Y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3


def unique(prefix: str = "Inputs") -> str:
    """A fresh cascade name: ids are global to the process."""
    return f"{prefix}{next(_names)}"


def pair() -> list[nn.Module]:
    return [nn.Linear(4, 3), nn.Linear(4, 3)]


def register(classifiers=None, x=X, y=Y, name=None, **kwargs) -> str:
    return register_cascade(name or unique(), classifiers or pair(), x, y, **kwargs)


class Returns(nn.Module):
    """A linear classifier whose output is post-processed by ``wrap``."""

    def __init__(self, wrap):
        super().__init__()
        self.linear, self.wrap = nn.Linear(4, 3), wrap

    def forward(self, x):
        return self.wrap(self.linear(x), x)


def raises(call, error, *fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from {raised.value!r}"
    return str(raised.value)


# -- classifiers are tried on real samples at registration -------------------------------------


@pytest.mark.parametrize(
    "wrap, fragments",
    [
        (lambda out, x: (out, x), ["'stage1'", "returned a tuple", "first element"]),
        (lambda out, x: {"logits": out}, ["'stage1'", "returned a dict", "'logits'"]),
        (lambda out, x: out.mean(0, keepdim=True), ["'stage1'", "(1, 3)", "batch of 3"]),
        (lambda out, x: out.reshape(-1), ["'stage1'", "(9,)", "batch of 3"]),
        (lambda out, x: out.unsqueeze(2), ["'stage1'", "(batch, 3)", "(3, 3, 1)"]),
        (lambda out, x: out.argmax(1, keepdim=True), ["'stage1'", "torch.int64", "predictions"]),
        (lambda out, x: out / (x == 0).all(), ["'stage1'", "non-finite"]),
        (lambda out, x: out[:, :2], ["'stage1'", "(batch, 3)", "like classifier 'stage0'"]),
        (lambda out, x: out.numpy(), ["'stage1'", "returned a ndarray"]),
    ],
    ids=["tuple", "dict", "ignores-batch", "flat", "3d", "ints", "nan-on-data", "classes", "np"],
)
def test_each_classifier_is_run_on_a_real_batch_and_its_output_checked(wrap, fragments):
    raises(lambda: register([nn.Linear(4, 3), Returns(wrap)]), ValueError, *fragments)


def test_a_classifier_that_fails_on_the_data_is_named_with_the_data_shape():
    message = raises(
        lambda: register([nn.Linear(4, 3), nn.Linear(5, 3)]),
        ValueError,
        "'stage1' failed on a batch of 3 samples",
        "(3, 4)",
    )
    assert "mat1 and mat2" in message  # torch's own reason follows


def test_explicit_num_classes_must_match_the_classifiers():
    raises(lambda: register(num_classes=4), ValueError, "'stage0'", "(batch, 4)", "num_classes=4")


def test_num_classes_comes_from_the_classifiers_not_from_the_largest_label():
    env_id = register(y=torch.zeros(10, dtype=torch.int64))  # class 0 only; classifiers say 3
    assert registered_cascade(env_id).cascade.num_classes == 3


def test_a_one_sample_split_is_probed_with_the_sample_repeated():
    env_id = register(x=X[:1], y=Y[:1])
    assert gym.make(env_id).unwrapped.num_samples == 1


@pytest.mark.parametrize(
    "y, fragments",
    [
        (nn.functional.one_hot(Y, 3).float(), ["got float one-hot of shape (10, 3)", "argmax(1)"]),
        (nn.functional.one_hot(Y, 3), ["got int64 one-hot of shape (10, 3)", "y.argmax(1)"]),
        (torch.rand(10, 3).softmax(1), ["got float scores of shape (10, 3)", "y.argmax(1)"]),
        (Y.float(), ["got torch.float32 values: use y.long()"]),
        (Y + 0.5, ["non-integer values such as 0.5"]),
        (Y.unsqueeze(1), ["shape (10, 1)", "y.squeeze(1)"]),
        (Y > 0, ["got bool values"]),
        (list(range(10)), ["y must be a torch tensor or NumPy array, got list"]),
    ],
    ids=["float-one-hot", "int-one-hot", "soft", "float", "fraction", "column", "bool", "list"],
)
def test_labels_that_are_not_class_indices_are_a_label_problem(y, fragments):
    error = TypeError if isinstance(y, list) else ValueError
    message = raises(lambda: register(y=y), error, "y must be", *fragments)
    assert "classifier" not in message


def test_numpy_data_is_accepted():
    env_id = register(x=X.numpy(), y=Y.numpy())
    assert gym.make(env_id).unwrapped.num_samples == 10


@pytest.mark.parametrize(
    "x, y, fragments",
    [
        (X, Y[:5], ["x and y", "10 and 5"]),
        (X[:0], Y[:0], ["at least one sample"]),
        (torch.tensor(1.0), Y, ["x", "scalar"]),
    ],
    ids=["lengths", "empty", "scalar-x"],
)
def test_data_shape_problems_name_x_and_y(x, y, fragments):
    raises(lambda: register(x=x, y=y), ValueError, *fragments)


def test_classifiers_on_different_devices_are_named_with_both_devices():
    on_meta = nn.Linear(4, 3, device="meta")
    raises(
        lambda: register([nn.Linear(4, 3), on_meta]),
        ValueError,
        "classifier 'stage1' is on meta",
        "classifier 'stage0' is on cpu",
        ".to('cpu')",
    )


@pytest.mark.parametrize(
    "classifiers, error, fragments",
    [
        (nn.Linear(4, 3), TypeError, ["classifiers", "one Linear"]),
        ([nn.Linear(4, 3), lambda x: x], TypeError, ["classifiers[1]", "function"]),
        ([nn.Linear(4, 3)], ValueError, ["K=1"]),
        ([nn.ReLU(), nn.ReLU()], ValueError, ["no parameters"]),
    ],
    ids=["one-module", "not-a-module", "one-classifier", "stateless"],
)
def test_classifiers_must_be_a_list_of_modules(classifiers, error, fragments):
    raises(lambda: register(classifiers), error, *fragments)


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"num_classes": 3.7}, ValueError, ["num_classes", "3.7"]),
        ({"num_classes": True}, ValueError, ["num_classes", "True"]),
        ({"num_classes": 1}, ValueError, ["num_classes", ">= 2", "1"]),
        ({"policy_hidden": 0}, ValueError, ["policy_hidden", "0"]),
        ({"policy_hidden": 2.5}, ValueError, ["policy_hidden", "2.5"]),
        ({"policy_hidden": False}, ValueError, ["policy_hidden", "False"]),
        ({"version": -1}, ValueError, ["version", "-1"]),
        ({"version": "1"}, ValueError, ["version", "'1'"]),
        ({"stage_names": "ab"}, TypeError, ["stage_names", "'ab'"]),
        ({"stage_names": ["a", "a"]}, ValueError, ["stage_names", "['a', 'a']"]),
        ({"stage_names": ["a"]}, ValueError, ["stage_names", "2"]),
        ({"overwrite": "yes"}, TypeError, ["overwrite", "'yes'"]),
        ({"name": "A:b"}, ValueError, ["name", "'A:b'"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_register_cascade_arguments_are_checked(kwargs, error, fragments):
    raises(lambda: register(**kwargs), error, *fragments)


def test_numpy_integers_are_integers():
    env_id = register(num_classes=np.int64(3), policy_hidden=np.int32(4), version=np.int64(2))
    assert env_id.endswith("-v2")
    vec = gym.make_vec(env_id, num_envs=np.int64(2), device="cpu")
    assert vec.unwrapped.num_envs == 2
    env = CascadeStoppingEnv(hand_outputs(), alpha=np.float32(0.5))
    assert env.alpha == 0.5


# -- numbers given to the environments ---------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, shown",
    [(True, "True"), (False, "False"), ("0.1", "'0.1'"), (-1, "-1"), (float("nan"), "nan")],
)
def test_alpha_must_be_a_finite_number_in_every_way_of_making_an_env(alpha, shown):
    env_id = register()
    makers = [
        lambda: CascadeStoppingEnv(hand_outputs(), alpha=alpha),
        lambda: CascadeStoppingVectorEnv(2, hand_outputs(), alpha=alpha, device="cpu"),
        lambda: gym.make(env_id, alpha=alpha),
        lambda: gym.make_vec(env_id, num_envs=2, alpha=alpha),
    ]
    for make in makers:
        raises(make, ValueError, "alpha must be a finite number >= 0", shown)


@pytest.mark.parametrize("num_envs, shown", [(2.7, "2.7"), (True, "True"), (0, "0"), ("2", "'2'")])
def test_num_envs_must_be_a_positive_integer(num_envs, shown):
    env_id = register()
    for make in (
        lambda: CascadeStoppingVectorEnv(num_envs, hand_outputs(), device="cpu"),
        lambda: gym.make_vec(env_id, num_envs=num_envs, device="cpu"),
    ):
        raises(make, ValueError, "num_envs must be an integer >= 1", shown)


def _single():
    return CascadeStoppingEnv(hand_outputs())


def _vector():
    return CascadeStoppingVectorEnv(2, hand_outputs(), device="cpu")


@pytest.mark.parametrize("make", [_single, _vector], ids=["single", "vector"])
def test_unknown_reset_options_are_rejected_naming_the_allowed_keys(make):
    env = make()
    raises(
        lambda: env.reset(options={"sample_idx": 1}),
        ValueError,
        "'sample_idx'",
        "did you mean 'sample_index'",
        "['sample_index']",
    )
    raises(lambda: env.reset(options=[1]), ValueError, "options", "[1]")
    env.reset(options={})  # no options is fine


@pytest.mark.parametrize("make", [_single, _vector], ids=["single", "vector"])
@pytest.mark.parametrize("seed, shown", [(2.5, "2.5"), (True, "True"), (-1, "-1"), ("1", "'1'")])
def test_seeds_are_non_negative_integers_in_both_envs(make, seed, shown):
    raises(lambda: make().reset(seed=seed), ValueError, "seed must be an integer >= 0", shown)


@pytest.mark.parametrize("make", [_single, _vector], ids=["single", "vector"])
def test_numpy_seeds_give_the_same_episodes_as_python_seeds(make):
    a, b = make(), make()
    first = a.reset(seed=np.int64(5))[1]["sample_index"]
    second = b.reset(seed=5)[1]["sample_index"]
    assert np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("index", [True, np.True_, 1.0])
def test_single_env_sample_index_must_be_an_integer(index):
    raises(
        lambda: _single().reset(options={"sample_index": index}),
        ValueError,
        "sample_index",
        repr(index),
    )


@pytest.mark.parametrize(
    "index, fragments",
    [
        ([0.5, 1.0], ["sample_index", "2 integers", "[0.5, 1.0]"]),
        ([True, False], ["sample_index", "[True, False]"]),
        ([0, 2], ["sample_index", "[0, 2)", "[0, 2]"]),
        ([0], ["sample_index", "(2,)", "(1,)"]),
        (["a", "b"], ["sample_index", "['a', 'b']"]),
    ],
    ids=["fractions", "bools", "out-of-range", "short", "strings"],
)
def test_vector_env_sample_index_must_be_integers_in_range(index, fragments):
    raises(lambda: _vector().reset(options={"sample_index": index}), ValueError, *fragments)


def test_vector_step_before_reset_raises_reset_needed_as_the_single_env_does():
    with pytest.raises(ResetNeeded) as single:
        _single().step(STOP)
    with pytest.raises(ResetNeeded) as vector:
        _vector().step(torch.ones(2, dtype=torch.int64))
    assert str(vector.value) == str(single.value)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"seed": 2.5}, ["seed", "2.5"]),
        ({"seed": True}, ["seed", "True"]),
        ({"alpha": True}, ["alpha", "True"]),
    ],
    ids=["seed-fraction", "seed-bool", "alpha-bool"],
)
def test_digits_id_checks_numbers_before_training(kwargs, fragments, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("pre-trained the classifiers before checking the arguments")

    monkeypatch.setattr(policycascade.supervised, "fit_classifiers", no_training)
    for make in (gym.make, lambda env_id, **kw: gym.make_vec(env_id, num_envs=2, **kw)):
        raises(lambda m=make: m(DIGITS_ID, **kwargs), ValueError, *fragments)
    raises(lambda: gym.make_vec(DIGITS_ID, num_envs=2.7), ValueError, "num_envs", "2.7")


def test_outputs_must_be_cascade_outputs():
    raises(lambda: CascadeStoppingEnv(hand_outputs().probs), TypeError, "outputs", "Tensor")
    raises(lambda: CascadeStoppingVectorEnv(2, None), TypeError, "outputs", "NoneType")


# -- registering a name twice --------------------------------------------------------------------


def test_registering_the_same_objects_again_returns_the_id_and_keeps_the_cache():
    classifiers, name = pair(), unique()
    env_id = register(classifiers, name=name)
    registered = registered_cascade(env_id)
    outputs = registered.outputs("val")
    assert register(classifiers, name=name) == env_id
    assert register(classifiers, x=X.clone(), y=Y.clone(), name=name) == env_id  # equal data
    assert registered_cascade(env_id) is registered
    assert registered.outputs("val") is outputs


@pytest.mark.parametrize(
    "change, what",
    [
        ({"classifiers": pair()}, "classifiers"),
        ({"x": X + 1}, "data"),
        ({"policy_hidden": 8}, "policy_hidden"),
        ({"stage_names": ["small", "big"]}, "stage_names"),
    ],
    ids=["classifiers", "data", "policy-hidden", "stage-names"],
)
def test_registering_a_name_again_with_something_else_needs_overwrite(change, what):
    classifiers, name = pair(), unique()
    env_id = register(classifiers, name=name)
    before = registered_cascade(env_id)
    kwargs = {"classifiers": classifiers, "name": name, **change}
    raises(lambda: register(**kwargs), ValueError, env_id, what, "overwrite=True")
    assert registered_cascade(env_id) is before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Overriding environment" warning from gymnasium
        assert register(**kwargs, overwrite=True) == env_id
    after = registered_cascade(env_id)
    assert after is not before
    probs = gym.make(env_id, split="val").unwrapped._probs
    assert torch.equal(probs, after.outputs("val").probs)


def test_overwrite_replaces_the_cached_outputs_of_the_same_objects():
    classifiers, name = pair(), unique()
    env_id = register(classifiers, name=name)
    stale = registered_cascade(env_id).outputs("test")
    with torch.no_grad():
        classifiers[0].weight.add_(1.0)  # the user trains further
    register(classifiers, name=name, overwrite=True)
    fresh = registered_cascade(env_id).outputs("test")
    assert not torch.equal(fresh.probs[:, 0], stale.probs[:, 0])


def test_an_id_registered_by_other_code_is_not_replaced_silently():
    name = unique()
    gym.register(f"policycascade/{name}-v0", entry_point=lambda: CascadeStoppingEnv(hand_outputs()))
    raises(lambda: register(name=name), ValueError, "already registered by other code", "overwrite")
    assert register(name=name, overwrite=True) == f"policycascade/{name}-v0"
