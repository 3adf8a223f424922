"""Which options the configured agent and path never read: they are refused, not ignored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policycascade.config_schema import TrainConfig


def option_value(config: TrainConfig, key: str) -> Any:
    """The value of option ``key`` (``name`` or ``section.name``) in ``config``."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


EMBEDDED_DATASETS = (
    "digits",
    "synthetic",
    "specialist",
    "digits-noisy",
    "synthetic-noisy",
    "digits-noisy-all",
    "synthetic-noisy-all",
    "synthetic-noisy-val10k",
)
ENV_DATA_UNREAD = ("dataset", "data_dir", "download", "cascade")
# what trains classifiers: unread for a registered cascade unless its copies are trained
ENV_TRAINING = (
    "augment",
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
ENV_UNREAD = ENV_DATA_UNREAD + ENV_TRAINING  # with frozen registered classifiers
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
        add(ENV_DATA_UNREAD, f"env {config.env!r} brings its classifiers and splits")
        if not config.continuation.train_classifiers:
            add(
                ENV_TRAINING,
                f"env {config.env!r} brings trained classifiers and their splits, so agent "
                "'continuation' trains no classifier and reads no data set (set "
                "continuation.train_classifiers to train copies of them)",
            )
            add(("processes",), f"env {config.env!r} brings trained classifiers: no folds to train")
        elif not config.lr_milestones:
            add(("lr_gamma",), "lr_gamma multiplies the lr at lr_milestones, and there are none")
        add(("compile",), "torch.compile is used by agent 'reinforce' only")
        return unread
    add(
        ("continuation.train_classifiers",),
        "train_classifiers is for a registered cascade (--env): a data set's classifiers "
        "are always trained",
    )
    if config.dataset in EMBEDDED_DATASETS:
        add(
            ("data_dir", "download"),
            f"dataset {config.dataset!r} is built in (no files to read or download)",
        )
    if config.agent != "reinforce":
        add(("compile",), f"torch.compile is used by agent 'reinforce' only, not {config.agent!r}")
    if config.agent != "continuation":
        add(("processes",), f"processes trains continuation folds; agent {config.agent!r} has none")
    elif config.continuation.folds == 0:
        add(("processes",), "processes trains cross-fitting folds, and continuation.folds is 0")
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
