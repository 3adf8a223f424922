"""Configs from YAML-like values: each value coerced to its field's type, unknown keys named."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import fields
from typing import Any, get_args, get_origin

from policycascade.config_checks import ConfigError, ConfigTypeError, field_types
from policycascade.config_schema import SECTIONS, TrainConfig


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's type, or raise naming the field."""
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [_coerce(name, item, inner) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigTypeError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigTypeError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigTypeError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigTypeError(f"{name} must be a string, got {value!r}")
    return value


def _updates(values: dict[str, Any], owner: type, where: str) -> dict[str, Any]:
    """Coerced field values of ``owner`` from a mapping; unknown keys get a did-you-mean."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {values!r}")
    known = {f.name for f in fields(owner)}
    hints = field_types(owner)
    updates = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {where} key {key!r}{hint}")
        updates[name] = _coerce(name, value, hints[name])
    return updates


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated config from ``values`` (shared keys, ``reinforce``/``ltc`` sections) on ``base``.

    A section for an algorithm other than the configured ``agent`` is rejected: its
    options would be ignored.
    """
    return build_config(values, base).validate()


def build_config(values: dict[str, Any], base: TrainConfig | None) -> TrainConfig:
    """``base`` updated with ``values``, each coerced to its field's type; not yet validated."""
    if not isinstance(values, dict):
        raise ConfigTypeError(
            f"a config must be a mapping of option names to values, got {values!r}"
        )
    if base is not None and not isinstance(base, TrainConfig):
        raise ConfigTypeError(f"base must be a TrainConfig or None, got {base!r}")
    base = base or TrainConfig()
    shared = {k: v for k, v in values.items() if k not in SECTIONS}
    agent = shared.get("agent", base.agent)
    # The configured agent's section first: ``epochs`` belongs to both.
    owners = sorted(SECTIONS, key=lambda name: name != agent)
    for key in shared:
        name = str(key).replace("-", "_")
        if name in TrainConfig.__dataclass_fields__:
            continue
        owner = next((o for o in owners if name in SECTIONS[o].__dataclass_fields__), None)
        if owner is not None:
            raise ConfigError(
                f"config key {key!r} belongs in the {owner!r} section ({owner}: {{{name}: ...}})"
            )
        for owner in owners:
            close = difflib.get_close_matches(name, sorted(SECTIONS[owner].__dataclass_fields__), 1)
            if close and not difflib.get_close_matches(name, _shared_names(), 1):
                raise ConfigError(
                    f"unknown config key {key!r}; did you mean {close[0]!r} in the {owner!r} "
                    f"section ({owner}: {{{close[0]}: ...}})?"
                )
    config = dataclasses.replace(base, **_updates(shared, TrainConfig, "config"))
    for name, section_type in SECTIONS.items():
        if name not in values or values[name] is None:
            continue
        if name != config.agent:
            raise ConfigError(
                f"the config has a {name!r} section but agent is {config.agent!r}: "
                f"its options would be ignored; remove the section or set agent: {name}"
            )
        section = dataclasses.replace(
            getattr(config, name), **_updates(values[name], section_type, f"{name} section")
        )
        config = dataclasses.replace(config, **{name: section})
    return config


def _shared_names() -> list[str]:
    return sorted(f.name for f in fields(TrainConfig) if f.name not in SECTIONS)
