"""The registry of users' cascades, by id: classifiers, splits and cached outputs, without gym.

:func:`check_registration` checks what a user brings (:mod:`policycascade.registry_checks`),
:func:`keep` keeps it under ``"policycascade/<name>-v<version>"`` and
:func:`registered_cascade` finds it again.
The harness and ``policycascade train`` read cascades from here, so training on a
registered cascade needs neither gymnasium nor :mod:`policycascade.envs`, which adds the
gym ids on top (:func:`policycascade.envs.registration.register_cascade`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from policycascade.builtin_ids import DIGITS_ID, NAMESPACE
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.costs import count_macs
from policycascade.data import DataSplits, Split
from policycascade.registry_checks import (
    SPLIT_NAMES,
    check_classifiers,
    check_devices,
    check_flag,
    check_integer,
    check_label_range,
    check_name,
    check_splits,
    check_stage_names,
    probe_num_classes,
    warn_if_not_cheapest_first,
)


def compute_outputs(
    cascade: Cascade, x: torch.Tensor, y: torch.Tensor, policy_hidden: int
) -> CascadeOutputs:
    """Every classifier's softmax on ``x`` (on CPU), with stage costs for a stopping module.

    The stage costs include a :class:`StoppingPolicy` of ``policy_hidden`` units per stage.
    """
    from policycascade.agents.stopping_policy import StoppingPolicy

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


def check_registration(
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
) -> RegisteredCascade:
    """A :class:`RegisteredCascade` of what a user brings, checked but not yet registered.

    The arguments are :func:`policycascade.envs.registration.register_cascade`'s. Every
    classifier is run on a few real samples here, so a wrong output (a tuple, the wrong
    size, a batch size ignored) fails now; costs are the classifiers' MACs on one sample.
    Samples may live on another device than the classifiers: batches move to theirs.
    """
    name = check_name(name)
    version = check_integer("version", version, 0)
    policy_hidden = check_integer("policy_hidden", policy_hidden, 1)
    if num_classes is not None:
        num_classes = check_integer("num_classes", num_classes, 2)
    classifiers = check_classifiers(classifiers)
    names = check_stage_names(stage_names, len(classifiers))
    data, single_split = check_splits(x, y, splits)
    device = check_devices(classifiers, names)
    first_x = next(iter(data.values()))[0]
    num_classes = probe_num_classes(classifiers, names, first_x, device, num_classes)
    check_label_range(data, num_classes, single_split)
    cascade = SampledCascade(classifiers, first_x[:1], num_classes, names)
    warn_if_not_cheapest_first(names, cascade.classifier_macs())  # measured now, once
    env_id = f"{NAMESPACE}/{name}-v{version}"
    return RegisteredCascade(env_id, cascade, data, policy_hidden, single_split)


def lookup(env_id: str) -> RegisteredCascade | None:
    """The registration that holds ``env_id`` now, or ``None``."""
    return _REGISTERED.get(env_id)


def keep(registered: RegisteredCascade, overwrite: bool = False) -> RegisteredCascade:
    """Register ``registered`` under its id; return the registration that holds the id now.

    The same classifiers, data and settings registered again return the earlier
    registration, whose cached outputs stay; different ones need ``overwrite=True``.
    Without gym, ``keep(check_registration(name, classifiers, ...))`` registers a cascade
    that :func:`registered_cascade` and the harness find.
    """
    overwrite = check_flag("overwrite", overwrite)
    previous = lookup(registered.env_id)
    if previous is not None and not overwrite:
        different = _differences(previous, registered)
        if not different:
            return previous
        raise ValueError(
            f"{registered.env_id} is already registered with different "
            f"{', '.join(different)}: pass overwrite=True to replace it, or choose another "
            "name or version"
        )
    _REGISTERED[registered.env_id] = registered
    return registered


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
    registered = lookup(env_id)
    if registered is None:
        hint = (
            "; the digits cascade's outputs come from "
            "policycascade.envs.digits_env.digits_outputs(split, seed, checkpoint)"
            if env_id == DIGITS_ID
            else ""
        )
        known = sorted(_REGISTERED)
        raise ValueError(
            f"{env_id!r} was not registered with register_cascade (registered: {known}){hint}"
        )
    return registered
