"""The config's schema: one dataclass per section, with each option's default and help."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from policycascade.config_checks import (
    ConfigError,
    check_alphas,
    check_at_least,
    check_non_negative,
    check_positive,
    check_types,
)
from policycascade.config_unread import option_value, unread_options
from policycascade.data import DATASETS
from policycascade.models import CASCADES
from policycascade.optimizers import OPTIMIZERS
from policycascade.stop_feature_names import FEATURE_SETS


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


AGENTS = ("reinforce", "ltc", "continuation")
WARM_STARTS = ("none", "rule", "thresholds")  # agents.reinforce_warm_start, without torch


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
        "exact",
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
    warm_start: str = _opt(
        "rule",
        "after pre-training, fit a stopping rule on the classifiers' policy-split outputs at the "
        "run's alpha and train the stopping modules to imitate its decisions before REINFORCE: "
        "'rule' (continuation-value rule on confidence features), 'thresholds' (best-reward "
        "confidence thresholds) or 'none'",
        WARM_STARTS,
    )
    warm_start_epochs: int = _opt(
        200,
        "passes over the policy-split outputs that the stopping modules imitate the warm-start "
        "rule for (binary cross-entropy; the classifiers are not trained in them)",
    )

    def validate(self) -> None:
        """Check the REINFORCE values; raise :class:`ConfigError` naming the first bad field."""
        check_types(self)
        check_alphas(self.alpha)
        check_at_least(self, ("rollouts", "policy_hidden", "policy_lr_decay_every"), 1)
        check_at_least(self, ("pretrain_epochs", "epochs"), 0)  # epochs=0: pre-training only
        if self.pretrain_epochs == 0 and self.epochs == 0:
            raise ConfigError("nothing to train: pretrain_epochs and epochs are both 0")
        check_positive(self, ("policy_lr", "policy_lr_decay", "joint_lr_scale"))
        check_non_negative(self, ("supervised_weight",))
        if self.baseline == "leave-one-out" and self.rollouts < 2:
            raise ConfigError(
                f"baseline 'leave-one-out' needs rollouts >= 2, got rollouts={self.rollouts}"
            )
        check_at_least(self, ("warm_start_epochs",), 1)
        default_epochs = ReinforceConfig.warm_start_epochs
        if self.warm_start == "none" and self.warm_start_epochs != default_epochs:
            raise ConfigError(
                f"warm_start_epochs={self.warm_start_epochs} would be ignored: warm_start is "
                "'none' (set warm_start to 'rule' or 'thresholds')"
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
        check_types(self)
        check_at_least(self, ("epochs",), 1, "ltc.")
        if not (0 <= self.epsilon < 1):
            raise ConfigError(f"ltc.epsilon must be in [0, 1), got {self.epsilon}")
        check_non_negative(self, ("cost", "weight"), "ltc.")


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
    train_classifiers: bool = _opt(
        False,
        "with --env: train copies of the registered classifiers on its 'fit' split (the "
        "shared training options, cross-fitted like a data set's) instead of keeping them "
        "frozen; the registered modules are never changed",
    )

    def validate(self) -> None:
        """Check the learner's values; raise :class:`ConfigError` naming the first bad field."""
        check_types(self)
        check_alphas(self.alpha)
        check_at_least(self, ("classifier_epochs",), 1)
        check_at_least(self, ("folds", "hidden"), 0)
        if self.folds == 1:
            raise ConfigError("folds must be 0 (fit on validation) or >= 2, got 1")
        check_non_negative(self, ("weight_decay",))


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
    processes: int = _opt(
        0,
        "processes that train the continuation learner's cross-fitting folds at once (the "
        "run's own included; results do not depend on it); 0: chosen from the work (the free "
        "CPU cores for a one-thread CPU run, else 1); 1: the run's process alone",
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
        check_types(self)
        for owner in (self, *(getattr(self, name) for name in SECTIONS)):
            for f in fields(owner):
                choices = f.metadata.get("choices")
                value = getattr(owner, f.name)
                if choices and value not in choices:
                    raise ConfigError(f"{f.name} must be one of {list(choices)}, got {value!r}")
        check_at_least(self, ("batch_size",), 1)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        check_positive(self, ("lr", "lr_gamma"))
        check_non_negative(self, ("weight_decay",))
        check_at_least(self, ("threads", "processes"), 0)
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
        elif not self.env or self.continuation.train_classifiers:  # each training run afresh
            total = self.continuation.classifier_epochs
            what = f"continuation.classifier_epochs = {total}"
        else:
            return  # a registered cascade's classifiers are not trained (unread_options)
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
