"""The training configuration: one dataclass behind YAML files, the CLI and ``--help``."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib.resources
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from policycascade.agents.stop_features import FEATURE_SETS
from policycascade.data import DATASETS
from policycascade.models import CASCADES
from policycascade.optimizers import OPTIMIZERS


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line (CLI exits with status 2)."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (both a ``ValueError`` and a ``TypeError``)."""


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


AGENTS = ("reinforce", "ltc", "continuation")


@dataclass
class ReinforceConfig:
    """REINFORCE (Guan et al.): pre-training, then the stopping policy (YAML ``reinforce:``)."""

    alpha: list[float] = _opt(
        [1e-3],
        "cost weight(s) in the reward -loss - alpha * cost (cost 1 = the most expensive "
        "classifier); several values train one run each",
    )
    pretrain_epochs: int = _opt(40, "epochs of cross-entropy pre-training of the classifiers")
    epochs: int = _opt(100, "epochs of REINFORCE training after pre-training")
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
    policy_gradient: str = _opt(
        "score-function",
        "how the stop decisions learn: REINFORCE's sampled 'score-function' estimator, or "
        "'exact' (gradient of the expected return enumerated over the K exits, no sampling noise)",
        ("score-function", "exact"),
    )
    loss: str = _opt("zero-one", "prediction loss in the reward", ("zero-one", "cross-entropy"))
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
    policy_inputs: str = _opt(
        "log-probs",
        "what each stopping module reads: the stage's softmax as log-probabilities in class "
        "order ('log-probs') or in descending order ('sorted-log-probs', the confidence profile)",
        ("sorted-log-probs", "log-probs"),
    )
    ensemble: bool = _opt(
        False, "at test time mix the visited classifiers, weighted by their stop probabilities"
    )

    def validate(self) -> None:
        """Check the REINFORCE values; raise :class:`ConfigError` naming the first bad field."""
        _check_types(self)
        _check_alphas(self.alpha)
        _check_at_least(self, ("rollouts", "policy_hidden", "policy_lr_decay_every"), 1)
        _check_at_least(self, ("pretrain_epochs", "epochs"), 0)  # epochs=0: pre-training only
        if self.pretrain_epochs == 0 and self.epochs == 0:
            raise ConfigError("nothing to train: pretrain_epochs and epochs are both 0")
        _check_positive(self, ("policy_lr", "policy_lr_decay", "joint_lr_scale"))
        _check_non_negative(self, ("supervised_weight",))
        if self.baseline == "leave-one-out" and self.rollouts < 2:
            raise ConfigError(
                f"baseline 'leave-one-out' needs rollouts >= 2, got rollouts={self.rollouts}"
            )


@dataclass
class LtcConfig:
    """Learning to Cascade (Enomoto & Eda 2021): CLI options ``--ltc-*``, YAML section ``ltc:``."""

    epochs: int = _opt(40, "epochs of LtC training of each classifier")
    cost: float = _opt(0.5, "cost parameter C of the cascade loss (Enomoto & Eda eq. 3)")
    weight: float = _opt(1.0, "weight w of the cascade loss term")
    epsilon: float = _opt(
        0.0, "thresholds keep validation accuracy >= (1 - epsilon) x the last classifier's"
    )
    form: str = _opt(
        "separate",
        "'separate' models trained from the most expensive down (eq. 5) or one shared-trunk "
        "'multi-exit' network (eq. 6, digits-sized inputs)",
        ("separate", "multi-exit"),
    )

    def validate(self) -> None:
        """Check the LtC values; raise :class:`ConfigError` naming the first bad field."""
        _check_types(self)
        _check_at_least(self, ("epochs",), 1, "ltc.")
        if not (0 <= self.epsilon < 1):
            raise ConfigError(f"ltc.epsilon must be in [0, 1), got {self.epsilon}")
        _check_non_negative(self, ("cost", "weight"), "ltc.")


@dataclass
class ContinuationConfig:
    """Continuation-value learner (Longstaff & Schwartz): CLI ``--cv-*``, YAML ``continuation:``."""

    alpha: list[float] = _opt(
        [1e-3], "cost weight(s) of the reward the rule maximises; several values train one run each"
    )
    classifier_epochs: int = _opt(
        40, "cross-entropy epochs of each classifier (kept from its best validation epoch)"
    )
    folds: int = _opt(
        5,
        "cross-fitting folds of the training split whose held-out outputs the rule is fitted "
        "on (0: fit on the validation split)",
    )
    feature_set: str = _opt(
        "history",
        "what a stop decision reads: 'max-softmax', 'confidence' (several confidence "
        "measures), 'history' (plus the earlier stages' confidences and agreement) or 'class' "
        "(plus the predicted class)",
        FEATURE_SETS,
    )
    answer: str = _opt(
        "exit",
        "a stop answers with the 'exit' classifier or the 'ensemble' of the visited stages",
        ("exit", "ensemble"),
    )
    hidden: int = _opt(0, "hidden units of each stage's value model (0: logistic regression)")
    weight_decay: float = _opt(1e-5, "L2 weight of each stage's value model")

    def validate(self) -> None:
        """Check the learner's values; raise :class:`ConfigError` naming the first bad field."""
        _check_types(self)
        _check_alphas(self.alpha)
        _check_at_least(self, ("classifier_epochs",), 1)
        _check_at_least(self, ("folds", "hidden"), 0)
        if self.folds == 1:
            raise ConfigError("folds must be 0 (fit on validation) or >= 2, got 1")
        _check_non_negative(self, ("weight_decay",))


SECTIONS = {"reinforce": ReinforceConfig, "ltc": LtcConfig, "continuation": ContinuationConfig}
CLI_PREFIX = {"reinforce": "", "ltc": "ltc-", "continuation": "cv-"}  # --baseline, --ltc-cost


@dataclass
class TrainConfig:
    """Everything a training run needs; the defaults are configs/digits.yaml.

    Options shared by every algorithm sit at the top level; each algorithm's own
    options sit in its section (``reinforce``, ``ltc``). A run uses the section of its
    ``agent``; options given for the other algorithm are rejected, not ignored.
    """

    env: str = _opt(
        "",
        "a cascade registered with register_cascade, as gymnasium names it ('mypkg.cascades:"
        "policycascade/MyCascade-v0' imports mypkg.cascades first): its frozen classifiers and "
        "its splits replace --dataset and --cascade (--agent continuation only)",
    )
    dataset: str = _opt("digits", "data set to train and evaluate on", DATASETS)
    data_dir: str = _opt("data", "directory that holds (or receives) the real image data sets")
    download: bool = _opt(False, "download a missing data set through torchvision (needs network)")
    augment: bool = _opt(
        False, "4-pixel zero pad, random crop and horizontal flip per image (Guan et al. 4.4)"
    )
    cascade: str = _opt("digits", "classifier family that forms the cascade", tuple(CASCADES))
    agent: str = _opt(
        "continuation",
        "algorithm that trains the cascade and its stopping rule: 'continuation' (independent "
        "classifiers, then a stopping rule fitted by continuation-value regression on "
        "cross-fitted outputs), 'reinforce' (Guan et al.: joint REINFORCE) or 'ltc' (Learning "
        "to Cascade with max-softmax thresholds)",
        AGENTS,
    )
    batch_size: int = _opt(64, "training mini-batch size")
    optimizer: str = _opt("adam", "optimiser of the classifiers", OPTIMIZERS)
    lr: float = _opt(3e-3, "learning rate of the classifiers")
    lr_milestones: list[int] = _opt(
        [], "epochs (pre-training included) after which the classifiers' lr is multiplied by ..."
    )
    lr_gamma: float = _opt(0.1, "... this factor")
    weight_decay: float = _opt(1e-4, "L2 weight decay of the classifiers")
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
    compile: str = _opt(
        "auto",
        "torch.compile the training forward passes (REINFORCE): 'auto' on CUDA only, 'on', "
        "'off'; a failure to compile falls back to eager with a one-line notice",
        ("auto", "on", "off"),
    )
    threads: int = _opt(
        0,
        "torch's intra-op CPU threads; 0: chosen from the work (1 for small classifiers such as "
        "digits, the free cores for large models or CUDA); OMP_NUM_THREADS or an earlier "
        "torch.set_num_threads call is kept unless this is set",
    )
    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)
    ltc: LtcConfig = field(default_factory=LtcConfig)
    continuation: ContinuationConfig = field(default_factory=ContinuationConfig)

    @property
    def algorithm(self) -> ReinforceConfig | LtcConfig:
        """The section of the configured ``agent``."""
        return getattr(self, self.agent)

    def validate(self) -> TrainConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad field.

        A value the configured path would not use (``optimizer: sgd`` for the continuation
        learner, ``dataset`` next to ``env``, ...) is refused here: every option is used or
        refused, never recorded and ignored.
        """
        _check_types(self)
        for owner in (self, *(getattr(self, name) for name in SECTIONS)):
            for f in fields(owner):
                choices = f.metadata.get("choices")
                value = getattr(owner, f.name)
                if choices and value not in choices:
                    raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        _check_at_least(self, ("batch_size",), 1)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        _check_positive(self, ("lr", "lr_gamma"))
        _check_non_negative(self, ("weight_decay",))
        _check_at_least(self, ("threads",), 0)
        if any(m < 1 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones must be epochs >= 1, got {self.lr_milestones}")
        if len(set(self.lr_milestones)) != len(self.lr_milestones):
            raise ConfigError(f"lr_milestones lists an epoch twice: {self.lr_milestones}")
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.env and self.agent != "continuation":
            raise ConfigError(
                f"env {self.env!r} holds frozen, trained classifiers: it needs --agent "
                f"continuation, got {self.agent!r}"
            )
        self._check_milestones_reached()
        default = TrainConfig(agent=self.agent)
        for key, reason in unread_options(self).items():
            value = option_value(self, key)
            if value != option_value(default, key):
                raise ConfigError(f"{key}={value!r} would be ignored: {reason}")
        return self

    def _check_milestones_reached(self) -> None:
        """Every lr milestone must fall before the last epoch of a schedule that uses it."""
        if self.agent == "reinforce":
            total = self.reinforce.pretrain_epochs + self.reinforce.epochs
            what = f"pretrain_epochs + epochs = {total}"
        elif self.agent == "ltc":
            total, what = self.ltc.epochs, f"ltc.epochs = {self.ltc.epochs} per model"
        else:
            return  # the continuation learner has no schedule (unread_options refuses one)
        late = [m for m in self.lr_milestones if m >= total]
        if late:
            raise ConfigError(
                f"lr_milestones {late} are not before the last epoch ({what}): the lr would "
                "never change there"
            )

    def to_dict(self) -> dict[str, Any]:
        """The shared options and the active algorithm's section (YAML/JSON-ready)."""
        values = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
            if f.name not in SECTIONS
        }
        values[self.agent] = dataclasses.asdict(self.algorithm)
        return values

    def changed_options(self) -> dict[str, Any]:
        """Every option that differs from the built-in defaults, as ``section.name: value``."""
        default = TrainConfig(agent=self.agent).to_dict()
        changed = {}
        for key, value in self.to_dict().items():
            if key in SECTIONS:
                for name, inner in value.items():
                    if default[key][name] != inner:
                        changed[f"{key}.{name}"] = inner
            elif default[key] != value:
                changed[key] = value
        return changed


def _check_alphas(alpha: list[float]) -> None:
    if not alpha:
        raise ConfigError("alpha needs at least one value")
    for a in alpha:
        if not (math.isfinite(a) and a >= 0):
            raise ConfigError(f"alpha must be finite and >= 0, got {a}")
    if len({float(a) for a in alpha}) != len(alpha):
        raise ConfigError(f"alpha lists a value twice: {alpha}")


def _check_at_least(owner: Any, names: tuple[str, ...], low: int, prefix: str = "") -> None:
    for name in names:
        if getattr(owner, name) < low:
            raise ConfigError(f"{prefix}{name} must be >= {low}, got {getattr(owner, name)}")


def _check_positive(owner: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _check_non_negative(owner: Any, names: tuple[str, ...], prefix: str = "") -> None:
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


def _check_types(owner: Any) -> None:
    """Raise :class:`ConfigTypeError` naming the first field whose value has the wrong type.

    Configs built in Python (``TrainConfig(reinforce=ReinforceConfig(alpha=0.01))``) get
    a message naming the field instead of ``'float' object is not iterable``.
    """
    hints = _field_types(type(owner))
    for f in fields(owner):
        value, hint = getattr(owner, f.name), hints[f.name]
        if not _has_type(value, hint):
            example = " (e.g. [0.01])" if f.name == "alpha" else ""
            raise ConfigTypeError(f"{f.name} must be {_type_name(hint)}{example}, got {value!r}")


def option_value(config: TrainConfig, key: str) -> Any:
    """The value of option ``key`` (``name`` or ``section.name``) in ``config``."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


EMBEDDED_DATASETS = ("digits", "synthetic", "specialist")
ENV_UNREAD = (
    "dataset",
    "data_dir",
    "download",
    "augment",
    "cascade",
    "batch_size",
    "optimizer",
    "lr",
    "lr_milestones",
    "lr_gamma",
    "weight_decay",
    "channels_last",
    "continuation.classifier_epochs",
    "continuation.folds",
)
# What the continuation learner's classifier training (policycascade.supervised) does not read.
CONTINUATION_UNREAD = ("augment", "optimizer", "lr_milestones", "lr_gamma", "precision")
REINFORCE_POLICY_TRAINING = (
    "baseline",
    "policy_split",
    "rollouts",
    "policy_gradient",
    "policy_optimizer",
    "policy_lr",
    "policy_lr_decay",
    "policy_lr_decay_every",
    "joint_lr_scale",
    "supervised_weight",
)


def unread_options(config: TrainConfig) -> dict[str, str]:
    """Options the configured agent and path never read, each with the reason (one line).

    Keys are ``name`` or ``section.name``. :meth:`TrainConfig.validate` refuses any of them
    set to a value other than its default; the command line refuses any of them given as
    a flag. The audit behind this list is in docs/bad-inputs.md.
    """
    unread: dict[str, str] = {}

    def add(keys: tuple[str, ...], reason: str) -> None:
        for key in keys:
            unread.setdefault(key, reason)

    if config.env:
        add(
            ENV_UNREAD,
            f"env {config.env!r} brings trained classifiers and their splits, so agent "
            "'continuation' trains no classifier and reads no data set",
        )
        add(("compile",), "torch.compile is used by agent 'reinforce' only")
        return unread
    if config.dataset in EMBEDDED_DATASETS:
        add(
            ("data_dir", "download"),
            f"dataset {config.dataset!r} is built in (no files to read or download)",
        )
    if config.agent == "continuation":
        add(
            CONTINUATION_UNREAD,
            "agent 'continuation' trains its classifiers with Adam in fp32, without "
            "augmentation or lr schedule (agents 'reinforce' and 'ltc' read it)",
        )
    if config.agent != "reinforce":
        add(("compile",), f"torch.compile is used by agent 'reinforce' only, not {config.agent!r}")
    if not config.lr_milestones:
        add(("lr_gamma",), "lr_gamma multiplies the lr at lr_milestones, and there are none")
    if config.agent == "ltc" and config.ltc.form == "multi-exit":
        add(
            ("cascade", "channels_last"),
            "agent 'ltc' with form 'multi-exit' trains its own shared-trunk network, "
            "not the configured cascade",
        )
    if config.agent == "reinforce":
        r = config.reinforce
        if r.epochs == 0:
            add(
                tuple(f"reinforce.{name}" for name in REINFORCE_POLICY_TRAINING),
                "agent 'reinforce' with epochs 0 only pre-trains the classifiers",
            )
        elif r.freeze_classifiers:
            add(
                ("reinforce.joint_lr_scale", "reinforce.supervised_weight"),
                "agent 'reinforce' with freeze_classifiers does not train the classifiers "
                "after pre-training",
            )
    return unread


def _field_types(owner: type = None) -> dict[str, Any]:
    return get_type_hints(owner or TrainConfig)


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
    hints = _field_types(owner)
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
    return _build(values, base).validate()


def _build(values: dict[str, Any], base: TrainConfig | None) -> TrainConfig:
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
        hint = _field_types(type(owner))[f.name]
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
    config = _build(values, base)
    unread = unread_options(config)
    for section, f, flag in _cli_options():
        key = f.name if section is None else f"{section}.{f.name}"
        value = getattr(args, _dest(section, f.name), None)
        if value is not None and key in unread:
            raise ConfigError(f"{_flag_text(flag, value)} would be ignored: {unread[key]}")
    return config.validate()
