"""The built-in ``policycascade/DigitsCascade-v0``: the embedded digits cascade as a gym env.

Its classifiers come from a run's checkpoint or are pre-trained here with cross-entropy,
once per process; its outputs are cached per split, seed and checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from policycascade.cascade import CascadeOutputs
from policycascade.cascade_registry import compute_outputs
from policycascade.envs.stopping_env import CascadeStoppingEnv, env_from_source
from policycascade.envs.vector_env import CascadeStoppingVectorEnv, vector_env_from_source
from policycascade.registry_checks import check_integer


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
    return env_from_source(_digits_source(split, seed, checkpoint), alpha, loss, render_mode)


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
    return vector_env_from_source(source, num_envs, alpha, loss, device)
