"""The config's errors and its type and range checks, shared by every config section."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line (CLI exits with status 2)."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (both a ``ValueError`` and a ``TypeError``)."""


def field_types(owner: type) -> dict[str, Any]:
    """The resolved type hint of each field of the dataclass ``owner``."""
    return get_type_hints(owner)


def check_alphas(alpha: list[float]) -> None:
    """Refuse an empty, negative, non-finite or repeated cost weight."""
    if not alpha:
        raise ConfigError("alpha needs at least one value")
    for a in alpha:
        if not (math.isfinite(a) and a >= 0):
            raise ConfigError(f"alpha must be finite and >= 0, got {a}")
    if len({float(a) for a in alpha}) != len(alpha):
        raise ConfigError(f"alpha lists a value twice: {alpha}")


def check_at_least(owner: Any, names: tuple[str, ...], low: int, prefix: str = "") -> None:
    """Refuse any of ``owner``'s integer fields ``names`` below ``low``."""
    for name in names:
        if getattr(owner, name) < low:
            raise ConfigError(f"{prefix}{name} must be >= {low}, got {getattr(owner, name)}")


def check_positive(owner: Any, names: tuple[str, ...]) -> None:
    """Refuse any of ``owner``'s fields ``names`` that is not a finite number > 0."""
    for name in names:
        value = getattr(owner, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def check_non_negative(owner: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Refuse any of ``owner``'s fields ``names`` that is not a finite number >= 0."""
    for name in names:
        value = getattr(owner, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{prefix}{name} must be a finite number >= 0, got {value}")


def _type_name(hint: Any) -> str:
    if get_origin(hint) is list:
        inner = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {inner.get(get_args(hint)[0], 'values')}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    return f"a {getattr(hint, '__name__', hint)} (a mapping in config_from_dict)"


def _has_type(value: Any, hint: Any) -> bool:
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_types(owner: Any) -> None:
    """Raise :class:`ConfigTypeError` naming the first field whose value has the wrong type.

    Configs built in Python (``TrainConfig(reinforce=ReinforceConfig(alpha=0.01))``) get
    a message naming the field instead of ``'float' object is not iterable``.
    """
    hints = field_types(type(owner))
    for f in fields(owner):
        value, hint = getattr(owner, f.name), hints[f.name]
        if not _has_type(value, hint):
            example = " (e.g. [0.01])" if f.name == "alpha" else ""
            raise ConfigTypeError(f"{f.name} must be {_type_name(hint)}{example}, got {value!r}")
