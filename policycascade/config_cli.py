"""The config on the command line: one flag per option, generated from the dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, get_args, get_origin

from policycascade.config_checks import ConfigError, field_types
from policycascade.config_files import load_config_file
from policycascade.config_schema import CLI_PREFIX, SECTIONS, TrainConfig
from policycascade.config_unread import unread_options
from policycascade.config_yaml import build_config, config_from_dict


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, except where there is none to show.

    Config options default to None on the command line (so that a config file can
    set them) and state their real default in their help text already.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _cli_options() -> list[tuple[str | None, Any, str]]:
    """(section or None, dataclass field, flag) for every config option."""
    options = [(None, f, "--" + f.name.replace("_", "-")) for f in fields(TrainConfig)]
    options = [o for o in options if o[1].name not in SECTIONS]
    for section, section_type in SECTIONS.items():
        for f in fields(section_type):
            if f.name == "alpha" and section != ALPHA_FLAG_SECTION:
                continue  # one --alpha for every algorithm that has one (config_from_args)
            options.append((section, f, "--" + CLI_PREFIX[section] + f.name.replace("_", "-")))
    return options


# ``--alpha`` is declared once, with the REINFORCE section's field, and goes to the section of
# whichever agent is chosen (every algorithm with a reward has an ``alpha``).
ALPHA_FLAG_SECTION = "reinforce"


def _dest(section: str | None, name: str) -> str:
    return name if section is None else f"{section}__{name}"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One CLI option per config field, grouped by section; defaults stay unset (None)."""
    defaults = TrainConfig()
    groups = {
        None: parser.add_argument_group("options of every algorithm"),
        "reinforce": parser.add_argument_group("REINFORCE options (--agent reinforce)"),
        "ltc": parser.add_argument_group("Learning-to-Cascade options (--agent ltc)"),
        "continuation": parser.add_argument_group(
            "continuation-value learner options (--agent continuation)"
        ),
    }
    for section, f, flag in _cli_options():
        owner = defaults if section is None else getattr(defaults, section)
        hint = field_types(type(owner))[f.name]
        default = getattr(owner, f.name)
        help_text = f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {
            "dest": _dest(section, f.name),
            "default": None,
            "help": help_text,
        }
        group = groups[section]
        if flag == "--alpha":
            group = groups[None]
            kwargs["help"] = (
                "cost weight(s) in the reward -loss - alpha * cost (cost 1 = the most expensive "
                f"classifier) of every agent but ltc; several values train one run each "
                f"(default: {default})"
            )
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(hint) is list:
            kwargs["nargs"] = "+"
            hint = get_args(hint)[0]
        kwargs["type"] = hint
        kwargs["metavar"] = f.name.upper()
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(flag, **kwargs)


def given_options(args: argparse.Namespace) -> list[str]:
    """The config flags given on the command line."""
    return [
        flag
        for section, f, flag in _cli_options()
        if getattr(args, _dest(section, f.name), None) is not None
    ]


def _flag_text(flag: str, value: Any) -> str:
    """A flag as the user typed it: ``--optimizer sgd``, ``--augment``, ``--alpha 0.1 0.2``."""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag.removeprefix("--")
    values = value if isinstance(value, list) else [value]
    return " ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` file, then every option given on the command line.

    A flag of an algorithm other than the configured ``agent`` is rejected.
    """
    base = TrainConfig()
    file_sections: list[str] = []
    if getattr(args, "config", None):
        file_values = load_config_file(args.config)
        base = config_from_dict(file_values, base)
        file_sections = [name for name in SECTIONS if name in file_values]
    values: dict[str, Any] = {}
    for section, f, _ in _cli_options():
        value = getattr(args, _dest(section, f.name), None)
        if value is None:
            continue
        if section is None:
            values[f.name] = value
        else:
            values.setdefault(section, {})[f.name] = value
    agent = values.get("agent", base.agent)
    ignored = [name for name in file_sections if name != agent]
    if ignored:
        raise ConfigError(
            f"--agent {agent} but the config file {args.config!r} sets the {ignored[0]!r} "
            "section, whose options would be ignored; use a config of that agent"
        )
    alpha = values.get(ALPHA_FLAG_SECTION, {}).get("alpha")
    if alpha is not None and agent != ALPHA_FLAG_SECTION:
        del values[ALPHA_FLAG_SECTION]["alpha"]
        if not values[ALPHA_FLAG_SECTION]:
            del values[ALPHA_FLAG_SECTION]
        if "alpha" not in SECTIONS[agent].__dataclass_fields__:
            raise ConfigError(
                f"--alpha does not apply to --agent {agent} (it picks its operating point "
                "otherwise; see --help)"
            )
        values.setdefault(agent, {})["alpha"] = alpha
    for section in SECTIONS:
        if section in values and section != agent:
            flags = [
                flag for s, f, flag in _cli_options() if s == section and f.name in values[section]
            ]
            raise ConfigError(
                f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} to "
                f"--agent {section} only, but the agent is {agent!r}"
            )
    config = build_config(values, base)
    unread = unread_options(config)
    for section, f, flag in _cli_options():
        key = f.name if section is None else f"{section}.{f.name}"
        value = getattr(args, _dest(section, f.name), None)
        if value is not None and key in unread:
            raise ConfigError(f"{_flag_text(flag, value)} would be ignored: {unread[key]}")
    return config.validate()
