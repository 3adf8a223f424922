"""Finding and reading config files: a path, or the name of a config shipped with the package."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from policycascade.config_checks import ConfigError

CONFIG_PACKAGE = "policycascade.configs"


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package (``--config NAME``)."""
    folder = importlib.resources.files(CONFIG_PACKAGE)
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file's path: an existing file, or the name of a shipped config."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = importlib.resources.files(CONFIG_PACKAGE) / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped config "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {problem}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of option names to values"
        )
    return data
