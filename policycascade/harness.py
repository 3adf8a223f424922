"""One run of any algorithm: device, seeding, data, cascade and costs, epochs, checkpoints, metrics.

The harness owns everything a training run needs except the learning itself, which
an :class:`~policycascade.agents.algorithm.Algorithm` does one epoch at a time
(REINFORCE, Learning to Cascade). Every algorithm therefore gets the same
checkpoint format, resume, signal handling, NaN checks, logging and evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from policycascade.agents.algorithm import Algorithm
from policycascade.agents.thresholds import best_reward_rule
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.cascade_registry import (
    RegisteredCascade,
    check_reported_split,
    registered_cascade,
    registered_split_sources,
    registered_splits,
)
from policycascade.checkpointing import (
    CHECKPOINT_FORMAT,
    Checkpointing,
    preserved_global_state,
)
from policycascade.config import TrainConfig
from policycascade.data import DataSplits, load_dataset
from policycascade.distributed import broadcast_buffers, current_context
from policycascade.evaluation import evaluate_exits, evaluate_rule
from policycascade.finite import FiniteChecks, NonFiniteError
from policycascade.harness_inputs import HarnessInputs
from policycascade.models import build_cascade
from policycascade.runtime import resolve_device, seed_everything


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the last finished epoch is safely checkpointed."""


def algorithm_class(agent: str) -> type[Algorithm]:
    """The algorithm registered under ``agent``."""
    from policycascade.agents.continuation_training import ContinuationTraining
    from policycascade.agents.ltc_training import LtcTraining
    from policycascade.agents.reinforce_training import ReinforceTraining

    algorithms = {
        "reinforce": ReinforceTraining,
        "ltc": LtcTraining,
        "continuation": ContinuationTraining,
    }
    return algorithms[agent]


class RunHarness(HarnessInputs, FiniteChecks, Checkpointing):
    """Builds and trains one (config, alpha) run into ``run_dir``; ``train=False`` only loads.

    ``data`` replaces the configured data set (benchmarks on random tensors, say).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        alpha: float | None = None,
        show_progress: bool = True,
        train: bool = True,
        data: DataSplits | None = None,
    ):
        self.config, self.run_dir = config, Path(run_dir)
        self.alpha = None if alpha is None else float(alpha)
        self.dist = current_context()
        self.show_progress = show_progress and self.dist.is_main
        self.device = resolve_device(config.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.trains = train
        if train:  # a config built in Python gets every check the command line gives
            config.validate()
            if config.threads:
                from policycascade.runtime import configure_threads

                configure_threads(config.threads, log=None)
        # Loading a run (``train=False``: load_run, compare) leaves the caller's generators
        # and torch flags as they were; training seeds them for the run.
        with contextlib.nullcontext() if train else preserved_global_state():
            seed_everything(config.seed, config.deterministic)
            self.registered = registered_cascade(config.env) if config.env else None
            # harness split -> registered split it reads (None: not a registered cascade)
            self.split_sources: dict[str, str] | None = None
            if self.registered is not None:  # a user's classifiers (frozen or copied) and splits
                check_trainable(config, self.registered)
                if train:
                    check_reported_split(self.registered)
                data = registered_splits(self.registered)
                self.split_sources = registered_split_sources(self.registered)
            self.data: DataSplits = (
                data
                if data is not None
                else load_dataset(config.dataset, config.seed, config.data_dir, config.download)
            )
            self.shuffle_generator = torch.Generator().manual_seed(config.seed)
            self.sample_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
            self.algorithm = algorithm_class(config.agent)(self, train=train)
            self.cascade: Cascade = self.algorithm.cascade
            self.costs = self.cascade.costs(self.algorithm.policy_macs())
        self.epoch = 0  # finished epochs
        self.history: list[dict[str, float]] = []
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._interrupted: dict[str, int | None] = {"signal": None}  # set by run()'s handler

    # -- what algorithms use ---------------------------------------------------------------

    @property
    def pretrained(self) -> bool:
        """Whether the classifiers come trained (a registered cascade) and stay frozen."""
        return self.registered is not None and not self.config.continuation.train_classifiers

    def build_cascade(self) -> Cascade:
        """The configured cascade family on the device (channels-last if configured).

        For a registered cascade: a frozen copy of its classifiers on the device, so that
        nothing a run does (moving, eval mode, ``requires_grad``, loading a checkpoint)
        reaches the modules the user registered.
        """
        if self.registered is not None:
            copied = frozen_copy(self.registered.cascade, self.device)
            if self.pretrained:
                return copied
            return copied.train().requires_grad_(True)  # a copy to train; theirs stays as is
        cascade = build_cascade(
            self.config.cascade, self.data.input_shape, self.data.num_classes
        ).to(self.device)
        if self.config.channels_last:
            cascade.to(memory_format=torch.channels_last)
        return cascade

    def parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DDP when several processes train together."""
        if self.dist.enabled:
            return torch.nn.parallel.DistributedDataParallel(module)
        return module

    def save_within_epoch(self) -> None:
        """Checkpoint part-way through an epoch (a long unit); stop here if a signal arrived.

        The algorithm's ``state_dict`` must then hold the unfinished epoch's progress, and
        its ``train_epoch`` continue from it when the run resumes at that epoch.
        """
        self.save()
        signum = self._interrupted["signal"]
        if signum is not None:
            raise TrainingInterrupted(
                f"stopped by signal {signum} part-way through epoch {self.epoch + 1} (saved); "
                f"continue with --resume {self.run_dir}"
            )

    # -- evaluation ------------------------------------------------------------------------

    def outputs(self, split: str) -> CascadeOutputs:
        """Every classifier's softmax on a split, with this run's stage costs."""
        x, y = self.split_on_device(split)
        with self.autocast():
            return self.cascade.outputs(x, y, self.costs, transform=self.inputs)

    def evaluate(self, split: str, outputs: CascadeOutputs | None = None) -> dict[str, Any]:
        """The algorithm's stopping rule on a split, by the one evaluation of every policy."""
        outputs = outputs or self.outputs(split)
        metrics = evaluate_rule(self.algorithm.rule(), outputs)
        metrics.update(self.algorithm.evaluation_extras(outputs))
        return metrics

    def final_metrics(self) -> dict[str, Any]:
        """Test-split metrics of the rule and of each single classifier (metrics.json).

        The val and test outputs it computes stay in ``final_outputs`` for the run's store.
        """
        test_outputs, val_outputs = self.outputs("test"), self.outputs("val")
        self.final_outputs = {"val": val_outputs, "test": test_outputs}
        extras = self.algorithm.final_extras()
        if self.alpha is not None:  # what the user would otherwise deploy at this alpha
            # (a threshold search prices its rules at 0 MACs of their own)
            rule = best_reward_rule(
                val_outputs.probs, val_outputs.labels, val_outputs.costs, self.alpha
            )
            extras["best_threshold_rule"] = {
                "criterion": rule.criterion,
                "thresholds": rule.thresholds,
                **evaluate_rule(rule, test_outputs),
            }
        metrics = {
            "agent": self.config.agent,
            "alpha": self.alpha,
            **self.evaluate("test", test_outputs),
            **extras,
            "single_classifiers": single_classifier_metrics(test_outputs, self.cascade.names),
            "val": self.evaluate("val", val_outputs),
            "costs": self.costs.as_dict(),
            "stage_names": self.cascade.names,
            "epochs_trained": self.epoch,
        }
        if self.split_sources is not None:  # which registered split each role read
            metrics["splits"] = dict(self.split_sources)
            metrics["test_held_out"] = not self.registered.single_split
        return metrics

    # -- the run ---------------------------------------------------------------------------

    def run(self, log: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        """Train from ``self.epoch`` to the end, checkpointing after every epoch.

        ``log(metrics, epoch)`` receives each epoch's scalars (the main process's
        TensorBoard writer). SIGINT/SIGTERM stop the run after the current epoch is
        saved, raising :class:`TrainingInterrupted`.
        """
        interrupted = self._interrupted = {"signal": None}

        def on_signal(signum, frame):
            interrupted["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        total = self.algorithm.num_epochs
        progress = tqdm(
            range(self.epoch, total),
            initial=self.epoch,
            total=total,
            desc=self.config.agent if self.alpha is None else f"alpha={self.alpha:g}",
            disable=not self.show_progress,
            leave=False,
        )
        try:
            for epoch in progress:
                metrics = self.algorithm.train_epoch(epoch)
                broadcast_buffers(self.dist, self.cascade)
                for _, module in self.algorithm.modules():
                    broadcast_buffers(self.dist, module)
                if self.algorithm.rule() is not None:
                    val = self.evaluate("val")
                    metrics.update(_tagged("val", val))
                    progress.set_postfix(
                        acc=f"{val['accuracy']:.3f}", share=f"{val['macs_share']:.3f}"
                    )
                self.epoch = epoch + 1
                self.history.append({"epoch": epoch + 1, **metrics})
                self.save()
                if log is not None:
                    log(metrics, epoch + 1)
                if interrupted["signal"] is not None:
                    raise TrainingInterrupted(
                        f"stopped by signal {interrupted['signal']} after epoch {epoch + 1}; "
                        f"continue with --resume {self.run_dir}"
                    )
        finally:
            progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.final_metrics()


def check_trainable(config: TrainConfig, registered: RegisteredCascade) -> None:
    """Training copies of registered classifiers needs a 'fit' split to train them on."""
    if config.continuation.train_classifiers and "fit" not in registered.split_names:
        raise ValueError(
            f"continuation.train_classifiers trains copies of {config.env!r}'s classifiers on "
            f"its 'fit' split, and it registered none (registered: "
            f"{list(registered.split_names)}): register splits={{'fit': ..., 'val': ..., "
            "'test': ...}"
        )


def frozen_copy(cascade: Cascade, device: torch.device) -> Cascade:
    """A copy of ``cascade`` on ``device``, in eval mode, without gradients (the original kept)."""
    try:
        copied = copy.deepcopy(cascade)
    except Exception as error:
        raise TypeError(
            "the registered classifiers cannot be copied with copy.deepcopy "
            f"({type(error).__name__}: {error}); policycascade trains on a copy so that your "
            "modules stay as they are"
        ) from error
    return copied.to(device).eval().requires_grad_(False)


def single_classifier_metrics(outputs: CascadeOutputs, names: list[str]) -> list[dict[str, Any]]:
    """Each classifier alone: its accuracy and its own MACs (no earlier stage, no policy)."""
    costs = outputs.costs
    first = torch.zeros(outputs.num_samples, dtype=torch.int64)
    accuracy = evaluate_exits(outputs, first)["stage_accuracy"]
    return [
        {
            "name": name,
            "accuracy": accuracy[t],
            "mean_macs": float(costs.alone_macs[t]),
            "macs_share": costs.alone_macs[t] / costs.reference_macs,
        }
        for t, name in enumerate(names)
    ]


def _tagged(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar TensorBoard tags for evaluation metrics (per-stage lists become one tag per stage)."""
    out = {}
    for key in ("accuracy", "mean_macs", "macs_share", "expected_reward"):
        if key in metrics:
            out[f"{prefix}/{key}"] = float(metrics[key])
    for t, share in enumerate(metrics["exit_distribution"]):
        out[f"{prefix}/exit_share/stage{t}"] = float(share)
    return out


__all__ = [
    "CHECKPOINT_FORMAT",
    "NonFiniteError",
    "RunHarness",
    "TrainingInterrupted",
    "algorithm_class",
    "frozen_copy",
    "preserved_global_state",
    "single_classifier_metrics",
]
