"""The training configuration: one dataclass behind YAML files, the CLI and ``--help``.

The names live in modules with one job each; this module gathers them, so that
``from policycascade.config import ...`` reads every one of them:

* :mod:`~policycascade.config_schema`: the dataclasses (shared options and one section per
  algorithm) with each option's default, help and choices;
* :mod:`~policycascade.config_checks`: the errors and the type and range checks;
* :mod:`~policycascade.config_unread`: which options an agent and path never read;
* :mod:`~policycascade.config_yaml`: a config from YAML-like values (``config_from_dict``);
* :mod:`~policycascade.config_files`: shipped configs and config files;
* :mod:`~policycascade.config_cli`: the command-line flags and ``config_from_args``.
"""

from __future__ import annotations

from policycascade.config_checks import ConfigError, ConfigTypeError
from policycascade.config_cli import (
    ALPHA_FLAG_SECTION,
    HelpFormatter,
    _cli_options,
    add_config_arguments,
    config_from_args,
    given_options,
)
from policycascade.config_files import (
    CONFIG_PACKAGE,
    load_config_file,
    resolve_config_path,
    shipped_configs,
)
from policycascade.config_schema import (
    AGENTS,
    CLI_PREFIX,
    SECTIONS,
    ContinuationConfig,
    LtcConfig,
    ReinforceConfig,
    TrainConfig,
)
from policycascade.config_unread import (
    EMBEDDED_DATASETS,
    ENV_UNREAD,
    REINFORCE_POLICY_TRAINING,
    option_value,
    unread_options,
)
from policycascade.config_yaml import config_from_dict

__all__ = [
    "AGENTS",
    "ALPHA_FLAG_SECTION",
    "CLI_PREFIX",
    "CONFIG_PACKAGE",
    "EMBEDDED_DATASETS",
    "ENV_UNREAD",
    "REINFORCE_POLICY_TRAINING",
    "SECTIONS",
    "ConfigError",
    "ConfigTypeError",
    "ContinuationConfig",
    "HelpFormatter",
    "LtcConfig",
    "ReinforceConfig",
    "TrainConfig",
    "_cli_options",
    "add_config_arguments",
    "config_from_args",
    "config_from_dict",
    "given_options",
    "load_config_file",
    "option_value",
    "resolve_config_path",
    "shipped_configs",
    "unread_options",
]
