"""Gym ids for cascades: the built-in digits cascade and ``register_cascade`` for users' own."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import torch
from torch import nn

from policycascade.agents.stopping_policy import StoppingPolicy
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.envs.stopping_env import CascadeStoppingEnv
from policycascade.envs.vector_env import CascadeStoppingVectorEnv
from policycascade.rewards import check_alpha, check_loss_name

NAMESPACE = "policycascade"
DIGITS_ID = f"{NAMESPACE}/DigitsCascade-v0"


class OutputsSource:
    """Computes a cascade's outputs on one data set once, on first use, and keeps them."""

    def __init__(self, cascade: Cascade, x: torch.Tensor, y: torch.Tensor, policy_hidden: int):
        self.cascade, self.x, self.y, self.policy_hidden = cascade, x, y, policy_hidden
        self._outputs: CascadeOutputs | None = None

    def __call__(self) -> CascadeOutputs:
        """The cached outputs (computed on the first call)."""
        if self._outputs is None:
            policy = StoppingPolicy(
                self.cascade.num_stages, self.cascade.num_classes, self.policy_hidden
            )
            costs = self.cascade.costs(policy.policy_macs())
            self._outputs = self.cascade.outputs(self.x, self.y, costs).to("cpu")
        return self._outputs


def _make_env(source, alpha=1e-3, loss="zero-one", render_mode=None) -> CascadeStoppingEnv:
    check_alpha(alpha), check_loss_name(loss)  # before the outputs, which may take a while
    return CascadeStoppingEnv(source(), alpha=alpha, loss=loss, render_mode=render_mode)


def _make_vector_env(source, num_envs=1, alpha=1e-3, loss="zero-one", device="auto"):
    check_alpha(alpha), check_loss_name(loss)  # before the outputs, which may take a while
    return CascadeStoppingVectorEnv(num_envs, source(), alpha=alpha, loss=loss, device=device)


def register_cascade(
    name: str,
    classifiers: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int | None = None,
    stage_names: Sequence[str] | None = None,
    policy_hidden: int = 64,
    version: int = 0,
) -> str:
    """Register trained ``classifiers`` (cheapest first) on samples ``x``/``y`` as a gym id.

    Returns the id, ``"policycascade/<name>-v<version>"``; ``gymnasium.make(id, alpha=...)``
    builds a :class:`CascadeStoppingEnv` and ``gymnasium.make_vec(id, num_envs=N)`` the
    batched :class:`CascadeStoppingVectorEnv`. Costs are measured on one sample of ``x``,
    with a stopping module of ``policy_hidden`` units per stage.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[\w:.-]+", name) or "-v" in name:
        raise ValueError(
            "name must be a plain name like 'MyCascade' (letters, digits, '_', ':', '.', '-'; "
            f"no spaces, '/' or '-v'), got {name!r}"
        )
    if len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of samples, got {len(x)} and {len(y)}")
    if len(y) == 0:
        raise ValueError("x and y must hold at least one sample")
    num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"y must hold class indices in [0, num_classes={num_classes}), "
            f"got values from {int(y.min())} to {int(y.max())}"
        )
    cascade = Cascade(classifiers, x.shape[1:], num_classes, stage_names)
    cascade.classifier_macs()  # measure now: a wrong output size fails at registration
    env_id = f"{NAMESPACE}/{name}-v{version}"
    source = OutputsSource(cascade, x, y.to(torch.int64), policy_hidden)
    gym.register(
        env_id,
        entry_point=functools.partial(_make_env, source),
        vector_entry_point=functools.partial(_make_vector_env, source),
    )
    return env_id


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
    hidden = defaults.policy_hidden
    if checkpoint is not None:
        from policycascade.checkpoint import load_checkpoint, state_dict_mismatch

        state = load_checkpoint(Path(checkpoint))
        try:
            cascade.load_state_dict(state["cascade"])
            hidden = state["config"]["policy_hidden"]
        except (KeyError, RuntimeError, TypeError) as error:
            raise ValueError(
                f"checkpoint {checkpoint} does not hold the digits cascade's classifiers "
                f"(a run of another cascade or program?): {state_dict_mismatch(error)}"
            ) from None
    else:
        fit_classifiers(
            cascade,
            data.train,
            defaults.pretrain_epochs,
            defaults.lr,
            defaults.batch_size,
            defaults.weight_decay,
            seed,
        )
    part = data.split(split)
    return OutputsSource(cascade, part.x, part.y, hidden)()


def _digits_source(split: str, seed: int, checkpoint: str | None):
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of train, val, test; got {split!r}")
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
