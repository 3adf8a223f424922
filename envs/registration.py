"""Gym ids for cascades: the built-in digits cascade and ``register_cascade`` for users' own."""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from policycascade.agents.stopping_policy import StoppingPolicy
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.costs import count_macs, eval_mode
from policycascade.data import DataSplits, Split
from policycascade.envs.stopping_env import CascadeStoppingEnv, check_env_alpha, check_integer
from policycascade.envs.vector_env import CascadeStoppingVectorEnv
from policycascade.rewards import check_loss_name

NAMESPACE = "policycascade"
DIGITS_ID = f"{NAMESPACE}/DigitsCascade-v0"
# The splits a stopping policy needs: samples to fit it on, to select or calibrate it
# (thresholds, alpha) and to report it.
SPLIT_NAMES = ("fit", "val", "test")
PROBE_SAMPLES = 3  # each classifier is tried on this many real samples at registration


def compute_outputs(
    cascade: Cascade, x: torch.Tensor, y: torch.Tensor, policy_hidden: int
) -> CascadeOutputs:
    """Every classifier's softmax on ``x`` (on CPU), with stage costs for a stopping module.

    The stage costs include a :class:`StoppingPolicy` of ``policy_hidden`` units per stage.
    """
    with torch.random.fork_rng(devices=[]):  # the policy's MACs do not depend on its weights
        policy_macs = StoppingPolicy(cascade.num_stages, cascade.num_classes, policy_hidden)
        policy_macs = policy_macs.policy_macs()
    return cascade.outputs(x, y, cascade.costs(policy_macs)).to("cpu")


class SampledCascade(Cascade):
    """A registered cascade: the user's classifiers, their MACs counted on a real sample.

    A user's classifiers may take any input (token ids, tables, images of any dtype), so
    costs are measured on ``cost_sample``, one sample of the registered data, rather than
    on a float zero image.
    """

    def __init__(
        self,
        classifiers: Sequence[nn.Module],
        cost_sample: torch.Tensor,
        num_classes: int,
        names: Sequence[str],
    ):
        super().__init__(classifiers, cost_sample.shape[1:], num_classes, names)
        self.cost_sample = cost_sample.detach().cpu().clone()  # (1, ...), a copy of the user's
        self._measured: list[int] | None = None

    def classifier_macs(self) -> list[int]:
        """MACs per sample of each classifier, counted once on :attr:`cost_sample`."""
        if self._measured is None:
            device = next(self.parameters()).device
            sample = self.cost_sample.to(device)
            self._measured = [count_macs(clf, sample) for clf in self.classifiers]
        return self._measured

    def alone_macs(self) -> list[int]:
        """Each classifier used on its own costs its own MACs."""
        return self.classifier_macs()


class _Split:
    """One split's samples and, once computed, the cascade's outputs on them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.outputs: CascadeOutputs | None = None


class RegisteredCascade:
    """A cascade registered with :func:`register_cascade`: its classifiers, splits and outputs.

    Each split's classifier outputs are computed the first time they are asked for (by
    :meth:`outputs` or by ``gymnasium.make``) and kept, so every environment made from
    the id and every policy fitted or compared on it sees the same cached predictions.

    Registered with one split (``register_cascade(name, classifiers, x, y)``), every split
    name in :data:`SPLIT_NAMES` refers to that one set of samples (``single_split`` is
    ``True``): a policy fitted on ``"fit"`` is then reported on the same samples.
    """

    def __init__(
        self,
        env_id: str,
        cascade: Cascade,
        splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        policy_hidden: int,
        single_split: bool,
    ):
        self.env_id = env_id
        self.cascade = cascade
        self.policy_hidden = policy_hidden
        self.single_split = single_split
        if single_split:
            ((x, y),) = splits.values()
            shared = _Split(x, y)
            self._splits = {name: shared for name in SPLIT_NAMES}
        else:
            self._splits = {name: _Split(*splits[name]) for name in SPLIT_NAMES if name in splits}

    @property
    def split_names(self) -> tuple[str, ...]:
        """The split names ``gymnasium.make(id, split=...)`` and :meth:`outputs` accept."""
        return tuple(self._splits)

    @property
    def default_split(self) -> str:
        """The split an environment samples when ``split`` is not given: the first registered."""
        return self.split_names[0]

    def check_split(self, split: str | None) -> str:
        """``split`` if registered (``None`` -> :attr:`default_split`), else raise naming them."""
        if split is None:
            return self.default_split
        if not isinstance(split, str) or split not in self._splits:
            raise ValueError(
                f"split must be one of {list(self.split_names)} (the splits registered for "
                f"{self.env_id}), got {split!r}"
            )
        return split

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``x`` and int64 labels ``y`` of a split, as registered."""
        part = self._splits[self.check_split(split)]
        return part.x, part.y

    def outputs(self, split: str) -> CascadeOutputs:
        """The cascade's cached outputs on a split (on CPU), computed on the first call."""
        split = self.check_split(split)
        part = self._splits[split]
        if part.outputs is None:
            outputs = compute_outputs(self.cascade, part.x, part.y, self.policy_hidden)
            bad = ~outputs.probs.isfinite().all(dim=2).all(dim=0)  # (stage,)
            if bool(bad.any()):
                names = [self.cascade.names[t] for t in bad.nonzero().flatten().tolist()]
                raise ValueError(
                    f"classifier(s) {names} returned non-finite logits (nan or inf) on split "
                    f"{split!r} of {self.env_id}: check the classifiers and the samples"
                )
            part.outputs = outputs
        return part.outputs

    def __repr__(self) -> str:
        """The id, the stage names and the split names."""
        return (
            f"RegisteredCascade({self.env_id!r}, stages={self.cascade.names}, "
            f"splits={list(self.split_names)}, single_split={self.single_split})"
        )


_REGISTERED: dict[str, RegisteredCascade] = {}


def _make_env(
    outputs: Callable[[], CascadeOutputs], alpha: float, loss: str, render_mode: str | None
) -> CascadeStoppingEnv:
    alpha, loss = check_env_alpha(alpha), check_loss_name(loss)  # before the outputs
    return CascadeStoppingEnv(outputs(), alpha=alpha, loss=loss, render_mode=render_mode)


def _make_vector_env(
    outputs: Callable[[], CascadeOutputs], num_envs: int, alpha: float, loss: str, device: str
) -> CascadeStoppingVectorEnv:
    num_envs = check_integer("num_envs", num_envs, 1)  # before the outputs
    alpha, loss = check_env_alpha(alpha), check_loss_name(loss)
    return CascadeStoppingVectorEnv(num_envs, outputs(), alpha=alpha, loss=loss, device=device)


def make_registered_env(
    registered: RegisteredCascade,
    alpha: float = 1e-3,
    loss: str = "zero-one",
    split: str | None = None,
    render_mode: str | None = None,
) -> CascadeStoppingEnv:
    """``gymnasium.make`` of an id from :func:`register_cascade`, on one registered split."""
    split = registered.check_split(split)
    return _make_env(lambda: registered.outputs(split), alpha, loss, render_mode)


def make_registered_vector_env(
    registered: RegisteredCascade,
    num_envs: int = 1,
    alpha: float = 1e-3,
    loss: str = "zero-one",
    split: str | None = None,
    device: str = "auto",
) -> CascadeStoppingVectorEnv:
    """``gymnasium.make_vec`` of an id from :func:`register_cascade`, on one registered split."""
    split = registered.check_split(split)
    return _make_vector_env(lambda: registered.outputs(split), num_envs, alpha, loss, device)


# -- checking what register_cascade is given ---------------------------------------------------


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or NumPy array, got {type(value).__name__}")
    return value


def _check_labels(y: torch.Tensor, where: str) -> torch.Tensor:
    """``y`` as int64 class indices of shape (N,); one-hot and float labels named as such."""
    expected = f"{where}y must be integer class indices of shape (N,)"
    kind = "float" if y.dtype.is_floating_point else str(y.dtype).removeprefix("torch.")
    if y.ndim == 2 and y.shape[1] == 1:
        raise ValueError(f"{expected}, got {kind} shape {tuple(y.shape)}: use y.squeeze(1)")
    if y.ndim == 2:
        one_hot = bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())
        what = "one-hot" if one_hot else "scores"
        shape = tuple(y.shape)
        raise ValueError(f"{expected}, got {kind} {what} of shape {shape}: use y.argmax(1)")
    if y.ndim != 1:
        raise ValueError(f"{expected}, got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{expected}, got {kind} values")
    if y.dtype.is_floating_point:
        if bool((y.isfinite() & (y == y.round())).all()):
            raise ValueError(f"{expected}, got {y.dtype} values: use y.long()")
        fraction = y[~(y.isfinite() & (y == y.round()))][0].item()
        raise ValueError(f"{expected}, got non-integer values such as {fraction}")
    return y.to(torch.int64)


def _check_data(x: Any, y: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's samples: tensors (or arrays), as many labels as samples, at least one."""
    x, y = _as_tensor(x, f"{where}x"), _as_tensor(y, f"{where}y")
    if x.ndim == 0:
        raise ValueError(f"{where}x must hold samples along its first dimension, got a scalar")
    if y.ndim == 0:
        raise ValueError(f"{where}y must be integer class indices of shape (N,), got a scalar")
    if len(x) != len(y):
        raise ValueError(
            f"{where}x and y must hold the same number of samples, got {len(x)} and {len(y)}"
        )
    if len(y) == 0:
        raise ValueError(f"{where}x and y must hold at least one sample")
    return x, _check_labels(y, where)


def _check_splits(
    x: Any, y: Any, splits: Any
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """The data as ``{split name: (x, y)}`` and whether it came as one split (``x, y``)."""
    if splits is None:
        if x is None or y is None:
            raise ValueError(
                "register_cascade needs data: x and y (one split) or "
                "splits={'val': (x_val, y_val), 'test': (x_test, y_test)}"
            )
        return {"all": _check_data(x, y, "")}, True
    if x is not None or y is not None:
        raise ValueError("give the data either as x, y (one split) or as splits=..., not both")
    if not isinstance(splits, Mapping) or not splits:
        raise TypeError(
            "splits must be a non-empty dict like {'val': (x_val, y_val), 'test': "
            f"(x_test, y_test)}} with keys among {list(SPLIT_NAMES)}, got {splits!r}"
        )
    checked = {}
    for name, data in splits.items():
        if name not in SPLIT_NAMES:
            hint = " ('fit' holds the samples a stopping policy is trained on)" * (name == "train")
            raise ValueError(f"splits keys must be among {list(SPLIT_NAMES)}, got {name!r}{hint}")
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(f"splits[{name!r}] must be a pair (x, y), got {type(data).__name__}")
        checked[name] = _check_data(*data, f"splits[{name!r}]: ")
    shapes = {name: (tuple(x.shape[1:]), x.dtype) for name, (x, _) in checked.items()}
    first, *others = shapes
    for name in others:
        if shapes[name] != shapes[first]:
            raise ValueError(
                f"splits[{name!r}] x holds samples of shape {shapes[name][0]} ({shapes[name][1]}) "
                f"but splits[{first!r}] x holds {shapes[first][0]} ({shapes[first][1]}): "
                "every split must hold the same kind of sample"
            )
    return checked, False


def _check_classifiers(classifiers: Any) -> list[nn.Module]:
    if isinstance(classifiers, nn.Module) and not isinstance(classifiers, nn.ModuleList):
        raise TypeError(
            "classifiers must be a list of trained nn.Modules, cheapest first, "
            f"got one {type(classifiers).__name__}"
        )
    if not isinstance(classifiers, (list, tuple, nn.ModuleList)):
        raise TypeError(
            "classifiers must be a list of trained nn.Modules, cheapest first, "
            f"got {type(classifiers).__name__}"
        )
    for t, clf in enumerate(classifiers):
        if not isinstance(clf, nn.Module):
            raise TypeError(
                f"classifiers[{t}] must be an nn.Module mapping a batch to (batch, C) logits, "
                f"got {type(clf).__name__}"
            )
    if len(classifiers) < 2:
        raise ValueError(f"a cascade needs at least 2 classifiers, got K={len(classifiers)}")
    return list(classifiers)


def _check_stage_names(stage_names: Any, num_stages: int) -> list[str]:
    if stage_names is None:
        return [f"stage{t}" for t in range(num_stages)]
    if isinstance(stage_names, str) or not all(isinstance(n, str) for n in stage_names):
        raise TypeError(f"stage_names must be a list of {num_stages} strings, got {stage_names!r}")
    names = list(stage_names)
    if len(names) != num_stages or len(set(names)) != num_stages:
        raise ValueError(
            f"stage_names must be {num_stages} different names, one per classifier, got {names}"
        )
    return names


def _device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (``None`` for a stateless module)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


def _check_devices(classifiers: list[nn.Module], names: list[str]) -> torch.device:
    """The one device every classifier's parameters are on."""
    devices = [(name, _device(clf)) for name, clf in zip(names, classifiers, strict=True)]
    devices = [(name, device) for name, device in devices if device is not None]
    if not any(next(clf.parameters(), None) is not None for clf in classifiers):
        raise ValueError("the classifiers hold no parameters: register trained nn.Modules")
    (first, device), *others = devices
    for name, other in others:
        if other != device:
            raise ValueError(
                f"classifier {name!r} is on {other} but classifier {first!r} is on {device}: "
                f"move every classifier to one device first, e.g. "
                f"[clf.to('{device}') for clf in classifiers] (x may stay where it is)"
            )
    return device


def _probe_num_classes(
    classifiers: list[nn.Module],
    names: list[str],
    x: torch.Tensor,
    device: torch.device,
    num_classes: int | None,
) -> int:
    """Run each classifier on a few real samples of ``x``; return the class count C they agree on.

    A batch of :data:`PROBE_SAMPLES` (samples repeated if ``x`` holds fewer) catches
    classifiers that return tuples or dicts, ignore the batch size or disagree on C.
    """
    batch = x[torch.arange(PROBE_SAMPLES) % len(x)].to(device)
    size = len(batch)
    agreed = None if num_classes is None else (num_classes, f"num_classes={num_classes}")
    for name, clf in zip(names, classifiers, strict=True):
        try:
            with eval_mode(clf), torch.no_grad():
                out = clf(batch)
        except Exception as error:
            raise ValueError(
                f"classifier {name!r} failed on a batch of {size} samples of x (shape "
                f"{tuple(batch.shape)}, {batch.dtype}, on {device}): "
                f"{type(error).__name__}: {error}"
            ) from error
        fix = "return a (batch, C) logits tensor"
        if isinstance(out, Mapping):
            key = next(iter(out), None)
            raise ValueError(
                f"classifier {name!r} returned a {type(out).__name__} with keys {list(out)}; "
                f"{fix}, e.g. wrap it to take the {key!r} entry"
            )
        if isinstance(out, (tuple, list)):
            raise ValueError(
                f"classifier {name!r} returned a {type(out).__name__}; {fix}, "
                "e.g. wrap it to take the first element"
            )
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"classifier {name!r} returned a {type(out).__name__}; {fix}")
        shape = tuple(out.shape)
        if out.ndim == 0 or shape[0] != size:
            raise ValueError(
                f"classifier {name!r} returned shape {shape} for a batch of {size} samples: "
                "its first dimension must be the batch (does it ignore the batch size, e.g. "
                "reshape to a fixed size?)"
            )
        expected = "C" if agreed is None else str(agreed[0])
        like = "" if agreed is None else f" ({agreed[1]})"
        if out.ndim != 2:
            raise ValueError(
                f"classifier {name!r} must map a batch to (batch, {expected}) logits{like}, "
                f"got output shape {shape}"
            )
        if not out.dtype.is_floating_point:
            raise ValueError(
                f"classifier {name!r} returned {out.dtype} values; {fix} of floating-point "
                "scores, not class predictions"
            )
        if agreed is None:
            agreed = (shape[1], f"like classifier {name!r}")
        elif shape[1] != agreed[0]:
            raise ValueError(
                f"classifier {name!r} must map a batch to (batch, {agreed[0]}) logits{like}, "
                f"got output shape {shape}"
            )
        if not bool(out.isfinite().all()):
            raise ValueError(
                f"classifier {name!r} returned non-finite logits (nan or inf) on samples of x"
            )
        if looks_like_probabilities(out):
            warnings.warn(
                f"classifier {name!r} seems to return probabilities, not logits (on {size} "
                "samples every row lies in [0, 1] and sums to 1): policycascade applies a "
                "softmax to each classifier's output, which flattens probabilities towards "
                "uniform; return logits (drop the final softmax) or log-probabilities",
                UserWarning,
                stacklevel=3,
            )
    assert agreed is not None
    if agreed[0] < 2:
        raise ValueError(f"the classifiers must score at least 2 classes, got C={agreed[0]}")
    return agreed[0]


def looks_like_probabilities(out: torch.Tensor) -> bool:
    """Whether every row of (batch, C) outputs lies in [0, 1] and sums to 1: a softmax's output."""
    out = out.detach().double()
    in_unit = bool(((out >= 0) & (out <= 1)).all())
    sums_to_one = bool(((out.sum(-1) - 1).abs() <= 1e-4).all())
    return in_unit and sums_to_one


def warn_if_not_cheapest_first(names: Sequence[str], macs: Sequence[int]) -> None:
    """Warn, naming both, when a classifier costs more than one registered after it."""
    for t in range(len(macs) - 1):
        later = min(range(t + 1, len(macs)), key=macs.__getitem__)
        if macs[t] > macs[later]:
            warnings.warn(
                f"classifiers should be registered cheapest first, but {names[t]!r} "
                f"({macs[t]:,} MACs) comes before {names[later]!r} ({macs[later]:,} MACs): "
                "the cascade runs them in the given order, so a sample that continues pays for "
                "the dearer one first and MAC shares can exceed 1; reorder the classifiers by "
                "cost unless this order is intended",
                UserWarning,
                stacklevel=3,
            )
            return


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    )


def _differences(old: RegisteredCascade, new: RegisteredCascade) -> list[str]:
    """What differs between two registrations of one id ([] when they are the same)."""
    different = []
    if len(old.cascade.classifiers) != len(new.cascade.classifiers) or any(
        a is not b for a, b in zip(old.cascade.classifiers, new.cascade.classifiers, strict=False)
    ):
        different.append("classifiers")
    if old.cascade.names != new.cascade.names:
        different.append("stage_names")
    if old.cascade.num_classes != new.cascade.num_classes:
        different.append("num_classes")
    if old.policy_hidden != new.policy_hidden:
        different.append("policy_hidden")
    if old.single_split != new.single_split or old.split_names != new.split_names:
        different.append("splits")
    elif any(
        not (_same_tensor(a.x, b.x) and _same_tensor(a.y, b.y))
        for a, b in zip(old._splits.values(), new._splits.values(), strict=True)
    ):
        different.append("data")
    return different


def register_cascade(
    name: str,
    classifiers: Sequence[nn.Module],
    x: torch.Tensor | np.ndarray | None = None,
    y: torch.Tensor | np.ndarray | None = None,
    *,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    num_classes: int | None = None,
    stage_names: Sequence[str] | None = None,
    policy_hidden: int = 64,
    version: int = 0,
    overwrite: bool = False,
) -> str:
    """Register trained ``classifiers`` (cheapest first) and their data as a gym id.

    Returns the id, ``"policycascade/<name>-v<version>"``. ``gymnasium.make(id, alpha=...,
    split=...)`` builds a :class:`CascadeStoppingEnv` on the samples of one split and
    ``gymnasium.make_vec(id, num_envs=N, split=...)`` the batched
    :class:`CascadeStoppingVectorEnv`; :func:`registered_cascade` returns the classifiers
    and the cached outputs per split.

    Args:
        name: plain name of the id (letters, digits, ``_``, ``.``, ``-``).
        classifiers: K >= 2 trained ``nn.Module``s on one device, cheapest first, each
            mapping a batch of samples to ``(batch, C)`` logits.
        x: one split's samples, ``(N, ...)``; every split name (``fit``, ``val``,
            ``test``) then samples this one split. Give either ``x``, ``y`` or ``splits``.
        y: that split's integer class indices, ``(N,)``.
        splits: ``{"fit": (x, y), "val": (x, y), "test": (x, y)}``, or any non-empty
            subset of those names, e.g. just ``val`` and ``test``.
        num_classes: C; by default the classifiers' output size.
        stage_names: one distinct name per classifier (default ``stage0``, ``stage1``, ...).
        policy_hidden: hidden units of the stopping module whose MACs each stage's cost
            includes.
        version: the id's ``-vN``.
        overwrite: replace an id registered with other classifiers, data or settings (and
            refresh the cached outputs); without it that is an error, while registering
            the same objects again returns the id and keeps the cache.

    Every classifier is run on a few real samples of the data here, so a wrong output
    (a tuple, the wrong size, a batch size ignored) fails at registration. The outputs
    themselves are computed on each split's first use. Samples may live on another
    device than the classifiers: batches are moved to the classifiers' device. Costs
    are the classifiers' MACs measured on one sample.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or "-v" in name:
        raise ValueError(
            "name must be a plain name like 'MyCascade' (letters, digits, '_', '.', '-'; "
            f"no spaces, '/', ':' or '-v'), got {name!r}"
        )
    version = check_integer("version", version, 0)
    policy_hidden = check_integer("policy_hidden", policy_hidden, 1)
    if num_classes is not None:
        num_classes = check_integer("num_classes", num_classes, 2)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    classifiers = _check_classifiers(classifiers)
    names = _check_stage_names(stage_names, len(classifiers))
    data, single_split = _check_splits(x, y, splits)
    device = _check_devices(classifiers, names)
    first_x = next(iter(data.values()))[0]
    num_classes = _probe_num_classes(classifiers, names, first_x, device, num_classes)
    for split, (_, labels) in data.items():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            where = "" if single_split else f"splits[{split!r}]: "
            raise ValueError(
                f"{where}y must hold class indices in [0, num_classes={num_classes}), "
                f"got values from {low} to {high}"
            )
    cascade = SampledCascade(classifiers, first_x[:1], num_classes, names)
    warn_if_not_cheapest_first(names, cascade.classifier_macs())  # measured now, once
    env_id = f"{NAMESPACE}/{name}-v{version}"
    registered = RegisteredCascade(env_id, cascade, data, policy_hidden, single_split)
    if env_id in gym.registry and not overwrite:
        previous = _REGISTERED.get(env_id)
        if previous is None or not _owns(env_id, previous):
            raise ValueError(
                f"{env_id} is already registered by other code: pass overwrite=True to "
                "replace it, or choose another name or version"
            )
        different = _differences(previous, registered)
        if not different:
            return env_id
        raise ValueError(
            f"{env_id} is already registered with different {', '.join(different)}: pass "
            "overwrite=True to replace it, or choose another name or version"
        )
    gym.registry.pop(env_id, None)
    gym.register(
        env_id,
        entry_point=functools.partial(make_registered_env, registered),
        vector_entry_point=functools.partial(make_registered_vector_env, registered),
    )
    _REGISTERED[env_id] = registered
    return env_id


def _owns(env_id: str, registered: RegisteredCascade) -> bool:
    """Whether gymnasium's entry for ``env_id`` is still the one ``registered`` was made for."""
    entry = gym.registry[env_id].entry_point
    return isinstance(entry, functools.partial) and entry.args[0] is registered


def registered_splits(registered: RegisteredCascade) -> DataSplits:
    """A registered cascade's samples as train/val/test splits for the run harness.

    ``fit`` is the training split; without one, the rule is fitted on ``val``.
    """

    def split(name: str, fallback: str) -> Split:
        x, y = registered.data(name if name in registered.split_names else fallback)
        return Split(torch.as_tensor(x), torch.as_tensor(y))

    val = split("val", registered.default_split)
    return DataSplits(
        registered.env_id.split("/")[-1],
        split("fit", "val" if "val" in registered.split_names else registered.default_split),
        val,
        split("test", registered.default_split),
        registered.cascade.num_classes,
    )


def registered_split_sources(registered: RegisteredCascade) -> dict[str, str]:
    """Which registered split each role of a run reads: ``{"train": ..., "val": ..., "test": ...}``.

    The same fallbacks as :func:`registered_splits`; a cascade registered as one split
    (``x, y``) reads ``"x, y"`` everywhere.
    """
    if registered.single_split:
        return {"train": "x, y", "val": "x, y", "test": "x, y"}
    names = registered.split_names
    default = registered.default_split
    val = "val" if "val" in names else default
    return {
        "train": "fit" if "fit" in names else val,
        "val": val,
        "test": "test" if "test" in names else default,
    }


def check_reported_split(registered: RegisteredCascade) -> None:
    """Refuse a run that would fit or choose its rule on the samples it reports on.

    A cascade registered as one split (``x, y``) chose in-sample evaluation: that is
    allowed with a warning, and the run's metrics say ``"test_held_out": false``.
    """
    env_id, names = registered.env_id, list(registered.split_names)
    fix = (
        "register splits={'val': (x_val, y_val), 'test': (x_test, y_test)} (and 'fit' if you "
        "have it), or register one split as x, y to evaluate in-sample on purpose"
    )
    if registered.single_split:
        warnings.warn(
            f"{env_id} was registered as one split (x, y): the rule is fitted, chosen and "
            "reported on the same samples, so its metrics are in-sample (metrics.json says "
            "test_held_out: false); register splits={'val': ..., 'test': ...} for held-out "
            "metrics",
            UserWarning,
            stacklevel=4,
        )
        return
    if "test" not in names:
        raise ValueError(
            f"{env_id} has no 'test' split (registered: {names}): a run reports on 'test', so "
            f"it would report on samples it fitted or chose the rule on; {fix}"
        )
    if "fit" not in names and "val" not in names:
        raise ValueError(
            f"{env_id} has no 'fit' or 'val' split (registered: {names}): the rule would be "
            f"fitted and chosen on the test samples it is reported on; {fix}"
        )
    test = registered._splits["test"]
    for name in ("fit", "val"):
        other = registered._splits.get(name)
        if other is not None and _same_tensor(other.x, test.x) and _same_tensor(other.y, test.y):
            raise ValueError(
                f"splits[{name!r}] and splits['test'] of {env_id} hold the same samples: the "
                f"rule would be fitted or chosen on the samples it is reported on; give "
                "'test' samples of their own, or register one split as x, y to evaluate "
                "in-sample on purpose"
            )


def registered_cascade(env_id: str) -> RegisteredCascade:
    """The cascade behind an id from :func:`register_cascade`, with its splits and outputs.

    ``env_id`` may name the module that registers it, as ``gymnasium.make`` accepts:
    ``"mypkg.cascades:policycascade/MyCascade-v0"`` imports ``mypkg.cascades`` first.
    """
    if not isinstance(env_id, str):
        raise TypeError(
            f"env_id must be a string like 'policycascade/MyCascade-v0', got {env_id!r}"
        )
    if ":" in env_id:
        from policycascade.cli_support import import_user_module

        module, env_id = env_id.split(":", 1)
        import_user_module(module, f"env_id {module}:{env_id}")  # as `python -m` finds it
    registered = _REGISTERED.get(env_id)
    if registered is None or env_id not in gym.registry or not _owns(env_id, registered):
        hint = (
            "; the digits cascade's outputs come from "
            "policycascade.envs.registration.digits_outputs(split, seed, checkpoint)"
            if env_id == DIGITS_ID
            else ""
        )
        known = sorted(i for i, r in _REGISTERED.items() if i in gym.registry and _owns(i, r))
        raise ValueError(
            f"{env_id!r} was not registered with register_cascade (registered: {known}){hint}"
        )
    return registered


# -- the built-in digits cascade ---------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def digits_outputs(
    split: str = "train", seed: int = 0, checkpoint: str | None = None
) -> CascadeOutputs:
    """The digits cascade's outputs on a split: classifiers from ``checkpoint`` or pre-trained here.

    Without a checkpoint the four classifiers are trained with cross-entropy
    (seeded, about 10 s on two CPU cores) once per process.
    """
    from policycascade.config import TrainConfig
    from policycascade.data import load_dataset
    from policycascade.models import build_cascade
    from policycascade.supervised import fit_classifiers

    defaults = TrainConfig()
    data = load_dataset("digits", seed)
    torch.manual_seed(seed)
    cascade = build_cascade("digits", data.input_shape, data.num_classes)
    hidden = defaults.reinforce.policy_hidden
    if checkpoint is not None:
        from policycascade.checkpoint import load_checkpoint, state_dict_mismatch

        state = load_checkpoint(Path(checkpoint))
        try:
            cascade.load_state_dict(state["state"]["cascade"])
            hidden = state["config"].get("reinforce", {}).get("policy_hidden", hidden)
        except (KeyError, RuntimeError, TypeError) as error:
            raise ValueError(
                f"checkpoint {checkpoint} does not hold the digits cascade's classifiers "
                f"(a run of another cascade or program?): {state_dict_mismatch(error)}"
            ) from None
    else:
        fit_classifiers(
            cascade,
            data.train,
            defaults.reinforce.pretrain_epochs,
            defaults.lr,
            defaults.batch_size,
            defaults.weight_decay,
            seed,
        )
    part = data.split(split)
    return compute_outputs(cascade, part.x, part.y, hidden)


def _digits_source(
    split: str, seed: int, checkpoint: str | Path | None
) -> Callable[[], CascadeOutputs]:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of train, val, test; got {split!r}")
    seed = check_integer("seed", seed, 0)
    return lambda: digits_outputs(split, seed, None if checkpoint is None else str(checkpoint))


def make_digits_env(
    alpha: float = 1e-3,
    loss: str = "zero-one",
    split: str = "train",
    seed: int = 0,
    checkpoint: str | None = None,
    render_mode: str | None = None,
) -> CascadeStoppingEnv:
    """``policycascade/DigitsCascade-v0``: the embedded digits cascade on one split."""
    return _make_env(_digits_source(split, seed, checkpoint), alpha, loss, render_mode)


def make_digits_vector_env(
    num_envs: int = 1,
    alpha: float = 1e-3,
    loss: str = "zero-one",
    split: str = "train",
    seed: int = 0,
    checkpoint: str | None = None,
    device: str = "auto",
) -> CascadeStoppingVectorEnv:
    """Batched ``policycascade/DigitsCascade-v0``."""
    source = _digits_source(split, seed, checkpoint)
    return _make_vector_env(source, num_envs, alpha, loss, device)


def register_builtin() -> None:
    """Register the built-in ids (idempotent)."""
    if DIGITS_ID not in gym.registry:
        gym.register(
            DIGITS_ID,
            entry_point="policycascade.envs.registration:make_digits_env",
            vector_entry_point="policycascade.envs.registration:make_digits_vector_env",
        )
