"""Run directories: create and train one, resume it safely, or load it back (``load_run``).

A run directory holds ``config.yaml`` (the run's resolved config), ``checkpoint.pt``
(the harness's one checkpoint format), TensorBoard events and, once trained,
``metrics.json`` and the stored outputs and rule of :mod:`policycascade.run_store`.
One process at a time writes a run directory: it is claimed atomically when created and
locked while training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from policycascade.agents.rules import StoppingRule
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.cascade_registry import registered_cascade
from policycascade.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
)
from policycascade.checkpointing import preserved_global_state
from policycascade.config import ConfigError, TrainConfig, config_from_dict
from policycascade.data import DataSplits
from policycascade.distributed import init_from_environment
from policycascade.fsutil import claim_new_dir
from policycascade.harness import CHECKPOINT_FORMAT, RunHarness, check_trainable
from policycascade.jsonio import write_json
from policycascade.run_store import (
    RunSummary,
    has_stored_outputs,
    read_outputs,
    read_rule,
    read_summary,
    store_run,
)

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"


def per_run_configs(config: TrainConfig) -> list[TrainConfig]:
    """One config per run: one per alpha for algorithms that have one, else the config."""
    section = config.algorithm
    if not hasattr(section, "alpha"):
        return [config]
    return [
        dataclasses.replace(config, **{config.agent: dataclasses.replace(section, alpha=[a])})
        for a in section.alpha
    ]


def run_alpha(config: TrainConfig) -> float | None:
    """The alpha of a one-run config (None for algorithms without one, such as LtC)."""
    alpha = getattr(config.algorithm, "alpha", None)
    return None if alpha is None else alpha[0]


def run_name(config: TrainConfig) -> str:
    """``<dataset>__<agent>[-frozen]__<baseline>__a<alpha>__s<seed>__<time>`` (LtC: C, w, eps)."""
    stamp = _shared_timestamp()
    if config.agent == "ltc":
        s = config.ltc
        detail = f"{s.form}__C{s.cost:g}__w{s.weight:g}__e{s.epsilon:g}"
        return f"{config.dataset}__ltc__{detail}__s{config.seed}__{stamp}"
    if config.agent == "continuation":
        c = config.continuation
        data = config.env.split("/")[-1] if config.env else config.dataset
        detail = f"{c.feature_set}-{c.answer}__f{c.folds}__a{c.alpha[0]:g}"
        return f"{data}__continuation__{detail}__s{config.seed}__{stamp}"
    r = config.reinforce
    agent = config.agent + ("-frozen" if r.freeze_classifiers else "")
    return f"{config.dataset}__{agent}__{r.baseline}__a{r.alpha[0]:g}__s{config.seed}__{stamp}"


def _shared_timestamp() -> str:
    """The current time, taken on rank 0 so that every process names the same run directory."""
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if init_from_environment().enabled:
        torch.distributed.broadcast_object_list(stamp, src=0)
    return stamp[0]


def unique_run_dir(logdir: Path, name: str) -> Path:
    """``logdir/name``, or ``name-2``, ``name-3``, ... if taken (a proposal: nothing is created).

    :func:`claim_run_dir` is the atomic form to use when the run starts.
    """
    candidate, n = logdir / name, 2
    while candidate.exists():
        candidate, n = logdir / f"{name}-{n}", n + 1
    return candidate


def claim_run_dir(logdir: Path, name: str) -> Path:
    """Create and return ``logdir/name`` or the first free ``name-N``, atomically.

    Two processes started together into one logdir never share a run directory.
    """
    return claim_new_dir(logdir, name)


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """Write the run's ``config.yaml`` into a new or freshly claimed, empty run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {str(run_dir)!r} is not empty: a new run never writes into another "
            "run's files (use --resume to continue a run)"
        )
    (run_dir / CONFIG_NAME).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's write lock for the block; a second writer fails with one line.

    The lock is an OS file lock: it goes with the process, so a killed run leaves none.
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): one writer is the user's to keep
        yield
        return
    handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"run directory {str(run_dir)!r} is being written by another process; wait for "
                "it to finish (one run directory has one writer)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def read_config(run_dir: str | Path) -> TrainConfig:
    """A run's configuration from its ``config.yaml``, without loading the checkpoint.

    A run directory without the file gives the checkpoint's config.
    """
    config_file = Path(run_dir) / CONFIG_NAME
    if config_file.is_file():
        return _config_file(config_file)
    return read_run(run_dir)[0]


# Options whose default changed after runs were stored: a stored config that lacks one was
# trained with the value it had then (REINFORCE's defaults changed on 2026-12-05).
STORED_BEFORE = {
    ("reinforce", "warm_start"): "none",
    ("reinforce", "policy_gradient"): "score-function",
}


def stored_config(values: Any) -> TrainConfig:
    """A stored run's config (checkpoint or config.yaml), read with the defaults it ran with."""
    if isinstance(values, dict):
        values = dict(values)
        for (section, name), then in STORED_BEFORE.items():
            part = values.get(section)
            if isinstance(part, dict) and name not in part:
                values[section] = {**part, name: then}
    return config_from_dict(values)


# libyaml's safe loader where PyYAML was built with it: the pure-Python one took 20 ms per
# stored config, a tenth of compare's time on five runs
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _config_file(config_file: Path) -> TrainConfig:
    """The config in a ``config.yaml``, or a ConfigError naming the file."""
    try:
        text = config_file.read_text(encoding="utf-8")
        return stored_config(yaml.load(text, Loader=_YAML_LOADER))  # noqa: S506 (a safe loader)
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config_file} cannot be read as a config: {error}") from None


def read_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[TrainConfig, dict]:
    """A run directory's config and checkpoint, checked against each other before any use."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ConfigError(
            f"expected a run directory, got the file {str(run_dir)!r}; pass {str(run_dir.parent)!r}"
        )
    checkpoint = load_checkpoint(run_dir, map_location=map_location)
    where = f"checkpoint {run_dir / CHECKPOINT_NAME}"
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where} was not written by this version of policycascade (expected a dict of "
            f"checkpoint format {CHECKPOINT_FORMAT})"
        )
    missing = [
        k
        for k in ("config", "algorithm", "epoch", "history", "state", "rng")
        if k not in checkpoint
    ]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}")
    try:
        config = stored_config(checkpoint["config"])
    except ConfigError as error:
        raise CheckpointError(f"{where} holds an invalid config: {error}") from None
    if checkpoint["algorithm"] != config.agent:
        raise CheckpointError(
            f"{where} was written by {checkpoint['algorithm']!r} but its config says agent "
            f"{config.agent!r}"
        )
    config_file = run_dir / CONFIG_NAME
    if config_file.is_file():
        on_disk = _config_file(config_file)
        differences = _differences(on_disk.to_dict(), config.to_dict())
        if differences:
            raise ConfigError(
                f"{config_file} and the checkpoint disagree ({'; '.join(differences[:3])}): "
                "the run directory was edited or mixed with another run; restore config.yaml "
                "or start a new run"
            )
    return config, checkpoint


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(
                f"{prefix}{key}: {a.get(key)!r} in config.yaml, {b.get(key)!r} in the checkpoint"
            )
    return out


def train_run(
    config: TrainConfig, run_dir: Path, resume: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) one run, log it to TensorBoard and write metrics.json; returns them.

    A new run's directory must be new or empty (see :func:`claim_run_dir`); the directory
    is locked against a second writer for the whole run.
    """
    harness = RunHarness(config, run_dir, run_alpha(config), show_progress=show_progress)
    if not harness.dist.is_main:  # in a distributed run only rank 0 logs and writes files
        if resume:
            harness.load(read_run(run_dir, map_location=harness.device)[1])
        return _run_as_bug_if_value_error(harness, None)
    if not resume:
        write_config(run_dir, config)
    with run_lock(run_dir):
        if resume:
            _, checkpoint = read_run(run_dir, map_location=harness.device)
            harness.load(checkpoint)
            remove_stale_temporaries(run_dir)  # what a kill during a checkpoint write left
        return _train_and_log(harness, config, run_dir, resume)


def _train_and_log(
    harness: RunHarness, config: TrainConfig, run_dir: Path, resume: bool
) -> dict[str, Any]:
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=harness.epoch + 1 if resume else None)
    try:
        if not resume:
            writer.add_text("hyperparameters", _hparams_table(config), 0)

        def log(metrics: dict[str, float], step: int) -> None:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            writer.flush()

        metrics = _run_as_bug_if_value_error(harness, log)
        _store(harness, run_dir)  # before metrics.json, which marks the run finished
        write_json(run_dir / METRICS_NAME, metrics)
        for split in ("val", "test"):
            values = metrics if split == "test" else metrics["val"]
            for key in ("accuracy", "mean_macs", "macs_share"):
                writer.add_scalar(f"{split}/final_{key}", values[key], harness.epoch)
        writer.add_hparams(
            hparams_of(config),
            {"hparam/accuracy": metrics["accuracy"], "hparam/macs_share": metrics["macs_share"]},
            run_name=".",
        )
    finally:
        writer.close()
    return metrics


def _store(harness: RunHarness, run_dir: Path) -> None:
    """The finished run's outputs, rule and labels (:mod:`policycascade.run_store`)."""
    algorithm = harness.algorithm
    outputs = harness.final_outputs  # computed once, by final_metrics
    names = list(harness.cascade.names)
    summary = RunSummary(
        label=algorithm.label,
        trains_like_reference=bool(algorithm.trains_like_reference),
        dataset=harness.data.name,
        stage_names=names,
        evaluation_extras={
            split: {k: float(v) for k, v in algorithm.evaluation_extras(out).items()}
            for split, out in outputs.items()
        },
    )
    store_run(run_dir, summary, outputs, algorithm.rule())


def hparams_of(config: TrainConfig) -> dict[str, Any]:
    """What tells runs apart in TensorBoard's HPARAMS tab: agent, seed, alpha, changed options."""
    values: dict[str, Any] = {"agent": config.agent, "seed": config.seed}
    alpha = run_alpha(config)
    if alpha is not None:
        values["alpha"] = alpha
    for key, value in config.changed_options().items():
        values.setdefault(key, value if isinstance(value, (int, float, str, bool)) else str(value))
    return values


def _hparams_table(config: TrainConfig) -> str:
    rows = []
    for key, value in config.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        rows += [(key if name is None else f"{key}.{name}", v) for name, v in items]
    return "|option|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in rows)


def _run_as_bug_if_value_error(harness: RunHarness, log) -> dict[str, Any]:
    """``harness.run``, with a ValueError raised while training shown as the bug it is.

    Every user input has been validated once the harness is built, so a ValueError
    from inside the training loop is not a usage error: it surfaces as a RuntimeError
    with its traceback instead of the one-line exit status 2.
    """
    try:
        return harness.run(log)
    except ValueError as error:
        raise RuntimeError(f"training failed unexpectedly: {error}") from error


class LoadedRun:
    """A trained run loaded back: config, stopping rule, cached outputs; cascade and data on demand.

    A finished run reads its stored outputs and rule (:mod:`policycascade.run_store`): no
    data set, no weights, no registered cascade needed. The training harness (data,
    classifiers) is built only when ``cascade``, ``data`` or ``harness`` is asked for, or for
    runs written before outputs were stored.
    """

    def __init__(self, run_dir: str | Path, device: str | None = None):
        self.run_dir = Path(run_dir)
        config, checkpoint = read_run(self.run_dir)
        if device is not None:
            config = dataclasses.replace(config, device=device)
        self.config: TrainConfig = config
        self.alpha = run_alpha(config)
        self._checkpoint: dict | None = checkpoint
        self._harness: RunHarness | None = None
        self._outputs: dict[str, CascadeOutputs] = {}
        self.stored = self.metrics is not None and has_stored_outputs(self.run_dir)
        if self.stored:
            self.summary = read_summary(self.run_dir)
            self._outputs = read_outputs(self.run_dir)
            self._rule = read_rule(self.run_dir)
            self._checkpoint = None  # everything needed is stored; the weights load on demand
        else:
            self.summary = RunSummary(
                label=self.harness.algorithm.label,
                trains_like_reference=bool(self.harness.algorithm.trains_like_reference),
                dataset=self.harness.data.name,
                stage_names=list(self.harness.cascade.names),
            )

    @property
    def harness(self) -> RunHarness:
        """The run's training harness with its checkpoint loaded (builds data and classifiers)."""
        if self._harness is None:
            checkpoint = self._checkpoint
            if checkpoint is None:
                checkpoint = read_run(self.run_dir)[1]
            harness = RunHarness(
                self.config, self.run_dir, self.alpha, show_progress=False, train=False
            )
            harness.load(checkpoint)
            harness.cascade.eval()
            self._harness, self._checkpoint = harness, None
        return self._harness

    @property
    def cascade(self) -> Cascade:
        """The run's classifiers, cheapest first."""
        return self.harness.cascade

    @property
    def stage_names(self) -> list[str]:
        """The classifiers' names, cheapest first."""
        return list(self.summary.stage_names)

    @property
    def rule(self) -> StoppingRule | None:
        """The stopping rule the run ended with (None for an unfinished LtC run)."""
        if self.stored:
            return self._rule
        return self.harness.algorithm.rule()

    @property
    def data(self) -> DataSplits:
        """The run's train/val/test splits (fixed by its seed)."""
        return self.harness.data

    @property
    def finished(self) -> bool:
        """Whether every epoch was trained."""
        return self.stored or self.harness.finished

    @property
    def progress(self) -> str:
        """``epoch E of N`` for messages about unfinished runs."""
        return f"epoch {self.harness.epoch} of {self.harness.algorithm.num_epochs}"

    @cached_property
    def metrics(self) -> dict[str, Any] | None:
        """The run's metrics.json (None before it finished)."""
        import json

        path = self.run_dir / METRICS_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def outputs(self, split: str) -> CascadeOutputs:
        """Every classifier's softmax on a split (stored or computed once), with the stage costs."""
        if split not in self._outputs:
            self._outputs[split] = self.harness.outputs(split)
        return self._outputs[split]

    def evaluate(self, split: str) -> dict[str, Any]:
        """The run's stopping rule on a split."""
        from policycascade.evaluation import evaluate_rule

        if self.stored:
            metrics = evaluate_rule(self.rule, self.outputs(split))
            metrics.update(self.summary.evaluation_extras.get(split, {}))
            return metrics
        return self.harness.evaluate(split, self.outputs(split))


def train_policy(
    env: str,
    alpha: float = 1e-2,
    logdir: str | Path = "runs",
    seed: int = 0,
    show_progress: bool = False,
    **continuation: Any,
) -> LoadedRun:
    """Learn a stopping rule for a registered cascade and return the finished run.

    ``env`` is an id from ``register_cascade`` (or ``"module:id"``, which imports the module
    that registers it). The classifiers stay as they are; the rule is fitted on the ``fit``
    split (else ``val``) by the continuation-value learner (``continuation`` overrides its
    options, e.g. ``feature_set="class"``). ``train_classifiers=True`` first trains copies of
    the registered modules (untrained or pretrained) on the ``fit`` split, each kept from its
    best validation epoch and cross-fitted like a data set's; the registered modules are
    never changed. The run directory under ``logdir`` holds the same
    files as any run: checkpoint, config.yaml, metrics.json and TensorBoard events.
    """
    values = {
        "env": env,
        "agent": "continuation",
        "seed": seed,
        "logdir": str(logdir),
        "continuation": {"alpha": [alpha], **continuation},
    }
    (config,) = per_run_configs(config_from_dict(values))
    check_trainable(config, registered_cascade(config.env))  # before any folder is made
    with preserved_global_state():  # the caller's random states and torch flags stay theirs
        run_dir = claim_run_dir(Path(logdir), run_name(config))
        train_run(config, run_dir, show_progress=show_progress)
        return load_run(run_dir)


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Load a run directory written by ``policycascade train``: cascade, rule, config, splits."""
    return LoadedRun(run_dir, device)
