"""Gymnasium environments: a cascade as an optimal-stopping MDP, single and natively batched."""

from policycascade.envs.registration import (
    DIGITS_ID,
    SPLIT_NAMES,
    RegisteredCascade,
    register_builtin,
    register_cascade,
    registered_cascade,
)
from policycascade.envs.stopping_env import CONTINUE, STOP, CascadeStoppingEnv
from policycascade.envs.vector_env import CascadeStoppingVectorEnv

__all__ = [
    "CONTINUE",
    "DIGITS_ID",
    "SPLIT_NAMES",
    "STOP",
    "CascadeStoppingEnv",
    "CascadeStoppingVectorEnv",
    "RegisteredCascade",
    "register_builtin",
    "register_cascade",
    "registered_cascade",
]
