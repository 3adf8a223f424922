"""Gym ids for cascades: ``register_cascade`` for users' own, and the built-in digits id.

The cascades themselves are kept by :mod:`policycascade.cascade_registry` (no gym needed);
this module adds the gym id on top, so that ``gymnasium.make(id)`` and
``gymnasium.make_vec(id)`` build environments on a registered cascade's cached outputs.
The names other code imported from here before the split are re-exported.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from policycascade.builtin_ids import DIGITS_ID, NAMESPACE, register_builtin
from policycascade.cascade_registry import (
    RegisteredCascade,
    SampledCascade,
    check_registration,
    check_reported_split,
    compute_outputs,
    keep,
    registered_cascade,
    registered_split_sources,
    registered_splits,
)
from policycascade.envs.digits_env import digits_outputs, make_digits_env, make_digits_vector_env
from policycascade.envs.stopping_env import CascadeStoppingEnv, env_from_source
from policycascade.envs.vector_env import CascadeStoppingVectorEnv, vector_env_from_source
from policycascade.registry_checks import (
    PROBE_SAMPLES,
    SPLIT_NAMES,
    check_flag,
    looks_like_probabilities,
    warn_if_not_cheapest_first,
)

__all__ = [
    "DIGITS_ID",
    "NAMESPACE",
    "PROBE_SAMPLES",
    "SPLIT_NAMES",
    "RegisteredCascade",
    "SampledCascade",
    "check_reported_split",
    "compute_outputs",
    "digits_outputs",
    "looks_like_probabilities",
    "make_digits_env",
    "make_digits_vector_env",
    "make_registered_env",
    "make_registered_vector_env",
    "register_builtin",
    "register_cascade",
    "registered_cascade",
    "registered_split_sources",
    "registered_splits",
    "warn_if_not_cheapest_first",
]


def make_registered_env(
    registered: RegisteredCascade,
    alpha: float = 1e-3,
    loss: str = "zero-one",
    split: str | None = None,
    render_mode: str | None = None,
) -> CascadeStoppingEnv:
    """``gymnasium.make`` of an id from :func:`register_cascade`, on one registered split."""
    split = registered.check_split(split)
    return env_from_source(lambda: registered.outputs(split), alpha, loss, render_mode)


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
    return vector_env_from_source(lambda: registered.outputs(split), num_envs, alpha, loss, device)


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

    Every classifier is run on a few real samples here, so a wrong output fails at
    registration (see :func:`~policycascade.cascade_registry.check_registration`); the
    outputs are computed on each split's first use, on the classifiers' device.
    """
    overwrite = check_flag("overwrite", overwrite)
    registered = check_registration(
        name,
        classifiers,
        x,
        y,
        splits=splits,
        num_classes=num_classes,
        stage_names=stage_names,
        policy_hidden=policy_hidden,
        version=version,
    )
    return _register_with_gym(registered, overwrite)


def _register_with_gym(registered: RegisteredCascade, overwrite: bool) -> str:
    """Keep ``registered`` in the cascade registry and point gymnasium's id at it."""
    env_id = registered.env_id
    if env_id in gym.registry and not overwrite and _gym_entry(env_id) is None:
        raise ValueError(
            f"{env_id} is already registered by other code: pass overwrite=True to "
            "replace it, or choose another name or version"
        )
    kept = keep(registered, overwrite)  # the same objects again keep the cached outputs
    if env_id not in gym.registry or _gym_entry(env_id) is not kept:
        gym.registry.pop(env_id, None)  # replaced without gymnasium's "Overriding" warning
        gym.register(
            env_id,
            entry_point=functools.partial(make_registered_env, kept),
            vector_entry_point=functools.partial(make_registered_vector_env, kept),
        )
    return env_id


def _gym_entry(env_id: str) -> RegisteredCascade | None:
    """The registered cascade behind gymnasium's entry for ``env_id``, if the entry is ours."""
    entry = gym.registry[env_id].entry_point
    ours = isinstance(entry, functools.partial) and entry.func is make_registered_env
    return entry.args[0] if ours else None
