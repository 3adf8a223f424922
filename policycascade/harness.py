"""One run of any algorithm: device, seeding, data, cascade and costs, epochs, checkpoints, metrics.

The harness owns everything a training run needs except the learning itself, which
an :class:`~policycascade.agents.algorithm.Algorithm` does one epoch at a time
(REINFORCE, Learning to Cascade). Every algorithm therefore gets the same
checkpoint format, resume, signal handling, NaN checks, logging and evaluation.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from policycascade.agents.algorithm import Algorithm
from policycascade.agents.thresholds import best_reward_rule
from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpointing import CHECKPOINT_FORMAT, Checkpointing
from policycascade.config import TrainConfig
from policycascade.data import NORMALISATION, DataSplits, load_dataset, to_float
from policycascade.distributed import broadcast_buffers, current_context
from policycascade.envs.registration import registered_cascade, registered_splits
from policycascade.evaluation import evaluate_exits, evaluate_rule
from policycascade.finite import FiniteChecks, NonFiniteError
from policycascade.models import build_cascade
from policycascade.runtime import resolve_device, seed_everything
from policycascade.supervised import batches

EVAL_BATCH = 1024


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


class RunHarness(FiniteChecks, Checkpointing):
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
        seed_everything(config.seed, config.deterministic)
        self.registered = registered_cascade(config.env) if config.env else None
        if self.registered is not None:  # a user's frozen classifiers and splits
            data = registered_splits(self.registered)
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

    # -- what algorithms use ---------------------------------------------------------------

    @property
    def pretrained(self) -> bool:
        """Whether the classifiers come trained (a registered cascade) and stay frozen."""
        return self.registered is not None

    def build_cascade(self) -> Cascade:
        """The configured cascade family on the device (channels-last if configured).

        For a registered cascade: its own classifiers, on the device.
        """
        if self.registered is not None:
            return self.registered.cascade.to(self.device).eval()
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

    def split_on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's images and labels on the device, copied there once per run."""
        if split not in self._on_device:
            data = self.data.split(split)
            self._on_device[split] = (data.x.to(self.device), data.y.to(self.device))
        return self._on_device[split]

    def num_samples(self, split: str) -> int:
        """Samples in a split, as the algorithms see it."""
        return len(self.split_on_device(split)[1])

    @contextlib.contextmanager
    def subset(self, split: str, size: int) -> Iterator[None]:
        """Train on the first ``size`` samples of a split only (benchmark warm-ups)."""
        full = self.split_on_device(split)
        self._on_device[split] = (full[0][:size], full[1][:size])
        try:
            yield
        finally:
            self._on_device[split] = full

    def inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Stored images -> model inputs on the device, one batch at a time.

        uint8 images are normalised here; training batches are augmented per image if
        configured (the data set stays on the device as uint8).
        """
        if x.dtype == torch.uint8:
            x = to_float(x, *NORMALISATION[self.config.dataset])
        if train and self.config.augment:
            x = random_crop_flip(x, pad=4, flip=True, generator=self.sample_generator)
        if self.config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the classifiers' passes when ``precision`` is ``bf16``."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def classify(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32, the forward pass at the configured precision."""
        with self.autocast():
            return module(x).float()

    @torch.no_grad()
    def eval_logits(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module``'s logits on stored images ``x`` in eval mode, in batches."""
        was_training = module.training
        module.eval()
        logits = torch.cat(
            [
                self.classify(module, self.inputs(x[i : i + EVAL_BATCH]))
                for i in range(0, len(x), EVAL_BATCH)
            ]
        )
        module.train(was_training)
        return logits

    def train_batches(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """One shuffled epoch of index batches (the run's shuffle generator by default)."""
        return batches(num_samples, self.config.batch_size, generator or self.shuffle_generator)

    def to_device(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a global index batch, on the device."""
        return self.dist.shard(idx).to(self.device)

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
        """Test-split metrics of the rule and of each single classifier (metrics.json)."""
        test_outputs, val_outputs = self.outputs("test"), self.outputs("val")
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
        return {
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

    # -- the run ---------------------------------------------------------------------------

    def run(self, log: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
        """Train from ``self.epoch`` to the end, checkpointing after every epoch.

        ``log(metrics, epoch)`` receives each epoch's scalars (the main process's
        TensorBoard writer). SIGINT/SIGTERM stop the run after the current epoch is
        saved, raising :class:`TrainingInterrupted`.
        """
        interrupted = {"signal": None}

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
    "single_classifier_metrics",
]
