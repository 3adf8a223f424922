"""The training configuration: one dataclass behind YAML files, the CLI and ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from policycascade.data import DATASETS
from policycascade.models import CASCADES
from policycascade.optimizers import OPTIMIZERS


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line (CLI exits with status 2)."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


AGENTS = ("reinforce", "ltc")


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are configs/digits.yaml."""

    dataset: str = _opt("digits", "data set to train and evaluate on", DATASETS)
    data_dir: str = _opt("data", "directory that holds (or receives) the real image data sets")
    download: bool = _opt(False, "download a missing data set through torchvision (needs network)")
    augment: bool = _opt(
        False, "4-pixel zero pad, random crop and horizontal flip per image (Guan et al. 4.4)"
    )
    cascade: str = _opt("digits", "classifier family that forms the cascade", tuple(CASCADES))
    alpha: list[float] = _opt(
        [1e-3],
        "cost weight(s) in the reward -loss - alpha * cost (cost 1 = the most expensive "
        "classifier); several values train one run each",
    )
    agent: str = _opt("reinforce", "stopping policy to train", AGENTS)
    freeze_classifiers: bool = _opt(
        False, "train only the stopping policy on frozen, pre-trained classifiers ('Ours (S)')"
    )
    baseline: str = _opt(
        "optimal-constant",
        "variance-reducing baseline of the REINFORCE estimator",
        ("none", "moving-average", "optimal-constant", "value", "leave-one-out"),
    )
    policy_split: str = _opt(
        "val",
        "split whose samples give the REINFORCE signal: 'train' (Guan et al.) or 'val' "
        "(held-out outputs, as threshold rules use; the classifiers' cross-entropy stays on train)",
        ("train", "val"),
    )
    rollouts: int = _opt(
        1, "stopping rollouts sampled per training input (leave-one-out needs >= 2)"
    )
    entropy_weight: float = _opt(
        0.0, "weight of an entropy bonus on the stop decisions (exploration; 0 = the paper's)"
    )
    label_estimator: str = _opt(
        "sample",
        "joint training under the 0/1 loss: 'sample' a label and use its score function "
        "(Guan et al.) or use the 'expected' 0/1 loss 1 - p(y) (same objective, no label noise)",
        ("sample", "expected"),
    )
    policy_gradient: str = _opt(
        "score-function",
        "how the stop decisions learn: REINFORCE's sampled 'score-function' estimator; "
        "'exact' (gradient of the expected return enumerated over the K exits, no sampling "
        "noise); or 'backward-induction' (each stage fitted to stop where stopping beats the "
        "continuation value, by cost-weighted cross-entropy; does not saturate)",
        ("score-function", "exact", "backward-induction"),
    )
    loss: str = _opt("zero-one", "prediction loss in the reward", ("zero-one", "cross-entropy"))
    pretrain_epochs: int = _opt(
        40,
        "epochs of cross-entropy pre-training of the classifiers (with --agent ltc: the "
        "epochs of LtC training of each classifier)",
    )
    epochs: int = _opt(
        100, "epochs of REINFORCE training after pre-training (not used by --agent ltc)"
    )
    batch_size: int = _opt(64, "training mini-batch size")
    optimizer: str = _opt("adam", "optimiser of the classifiers", OPTIMIZERS)
    lr: float = _opt(3e-3, "learning rate of the classifiers")
    lr_milestones: list[int] = _opt(
        [], "epochs (pre-training included) after which the classifiers' lr is multiplied by ..."
    )
    lr_gamma: float = _opt(0.1, "... this factor")
    weight_decay: float = _opt(1e-4, "L2 weight decay of the classifiers")
    policy_optimizer: str = _opt(
        "adam",
        "optimiser of the stopping modules and baseline (Guan et al.: SGD, momentum 0.9)",
        OPTIMIZERS,
    )
    policy_lr: float = _opt(
        3e-3, "learning rate of the stopping modules (Guan et al. 4.4: 0.1 with SGD)"
    )
    policy_lr_decay: float = _opt(0.9, "factor the policy learning rate is multiplied by ...")
    policy_lr_decay_every: int = _opt(4, "... every this many REINFORCE epochs (Guan et al.: 4)")
    joint_lr_scale: float = _opt(
        0.1, "classifier learning rate during joint training, as a multiple of --lr"
    )
    supervised_weight: float = _opt(
        1.0, "weight of the cross-entropy term kept on every classifier during joint training"
    )
    policy_hidden: int = _opt(
        16, "hidden units of each stopping module (paper: 64 on CIFAR, 256 on ImageNet)"
    )
    policy_init: str = _opt(
        "random",
        "start of the stopping modules: 'random', or 'max-softmax' (imitate the max-softmax "
        "threshold rule with the best reward at this alpha on the policy split, then learn)",
        ("random", "max-softmax"),
    )
    policy_inputs: str = _opt(
        "log-probs",
        "what each stopping module reads: the stage's softmax as log-probabilities, "
        "'sorted-log-probs' in descending order (the confidence profile) or 'log-probs' in "
        "class order",
        ("sorted-log-probs", "log-probs"),
    )
    ltc_cost: float = _opt(0.5, "LtC: cost parameter C of the cascade loss (Enomoto & Eda eq. 3)")
    ltc_weight: float = _opt(1.0, "LtC: weight w of the cascade loss term")
    ltc_epsilon: float = _opt(
        0.0, "LtC: thresholds keep validation accuracy >= (1 - epsilon) x the last classifier's"
    )
    ltc_form: str = _opt(
        "separate",
        "LtC: 'separate' models trained from the most expensive down (eq. 5) or one shared-trunk "
        "'multi-exit' network (eq. 6, digits-sized inputs)",
        ("separate", "multi-exit"),
    )
    ensemble: bool = _opt(
        False, "at test time mix the visited classifiers, weighted by their stop probabilities"
    )
    seed: int = _opt(0, "seed of the data split, initialisation and sampling")
    device: str = _opt("auto", "'auto' (CUDA if present, else CPU), 'cpu' or 'cuda[:N]'")
    logdir: str = _opt("runs", "directory that receives one sub-directory per run")
    deterministic: bool = _opt(False, "use PyTorch's deterministic algorithms (for CUDA)")
    precision: str = _opt(
        "fp32",
        "arithmetic of the classifiers' forward and backward passes: 'fp32', or 'bf16' "
        "(autocast to bfloat16; the stopping policy, losses and optimiser stay in fp32)",
        ("fp32", "bf16"),
    )
    channels_last: bool = _opt(
        False, "keep image batches and convolution weights in channels-last memory layout"
    )

    def validate(self) -> TrainConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad field."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        if not self.alpha:
            raise ConfigError("alpha needs at least one value")
        for a in self.alpha:
            if not (math.isfinite(a) and a >= 0):
                raise ConfigError(f"alpha must be finite and >= 0, got {a}")
        for name in ("batch_size", "rollouts", "policy_hidden", "policy_lr_decay_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_epochs", "epochs"):  # epochs=0: pre-training only
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pretrain_epochs == 0 and self.epochs == 0:
            raise ConfigError("nothing to train: pretrain_epochs and epochs are both 0")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("lr", "lr_gamma", "policy_lr", "policy_lr_decay", "joint_lr_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if not (0 <= self.ltc_epsilon < 1):
            raise ConfigError(f"ltc_epsilon must be in [0, 1), got {self.ltc_epsilon}")
        if any(m < 1 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones must be epochs >= 1, got {self.lr_milestones}")
        for name in (
            "weight_decay",
            "supervised_weight",
            "ltc_cost",
            "ltc_weight",
            "entropy_weight",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.baseline == "leave-one-out" and self.rollouts < 2:
            raise ConfigError(
                f"baseline 'leave-one-out' needs rollouts >= 2, got rollouts={self.rollouts}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (YAML/JSON-ready)."""
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's type, or raise naming the field."""
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [_coerce(name, item, inner) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated config from ``values`` over ``base``; unknown keys get a did-you-mean."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of option names to values, got {values!r}")
    known = {f.name for f in fields(TrainConfig)}
    hints = _field_types()
    updates = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        updates[name] = _coerce(name, value, hints[name])
    return dataclasses.replace(base or TrainConfig(), **updates).validate()


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, except where there is none to show.

    Config options default to None on the command line (so that a config file can
    set them) and state their real default in their help text already.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One CLI option per config field, with the field's help; defaults stay unset (None)."""
    hints = _field_types()
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(hint) is list:
            kwargs["nargs"] = "+"
            hint = get_args(hint)[0]
        kwargs["type"] = hint
        kwargs["metavar"] = f.name.upper()
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` file, then every option given on the command line."""
    base = TrainConfig()
    if getattr(args, "config", None):
        base = config_from_dict(load_config_file(args.config), base)
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    return config_from_dict(overrides, base)
