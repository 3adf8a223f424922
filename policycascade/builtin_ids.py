"""The built-in gym ids, registered by name only: registering imports neither torch nor a model."""

from __future__ import annotations

NAMESPACE = "policycascade"
DIGITS_ID = f"{NAMESPACE}/DigitsCascade-v0"
_ENVS = "policycascade.envs.digits_env"


def register_builtin() -> None:
    """Register the built-in ids with gymnasium (idempotent)."""
    import gymnasium as gym

    if DIGITS_ID not in gym.registry:
        gym.register(
            DIGITS_ID,
            entry_point=f"{_ENVS}:make_digits_env",
            vector_entry_point=f"{_ENVS}:make_digits_vector_env",
        )
