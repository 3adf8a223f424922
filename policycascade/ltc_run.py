"""``--agent ltc``: train a Learning-to-Cascade cascade, fit thresholds on validation, test it."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from policycascade.agents.ltc import (
    LtcThresholdRule,
    MultiExitNet,
    OptimizerSpec,
    fit_ltc_thresholds,
    train_ltc_cascade,
    train_ltc_multi_exit,
)
from policycascade.agents.rules import stop_decisions
from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from policycascade.config import TrainConfig
from policycascade.data import NORMALISATION, DataSplits, Split, load_dataset, to_float
from policycascade.evaluation import evaluate_exits, first_stop
from policycascade.models import build_cascade
from policycascade.runtime import resolve_device, seed_everything
from policycascade.trainer import TrainingInterrupted, single_classifier_metrics


class LtcRun:
    """The cascade, data and fitted thresholds of one LtC run (trained or loaded)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        seed_everything(config.seed, config.deterministic)
        data = load_dataset(config.dataset, config.seed, config.data_dir, config.download)
        self.data = _as_float(data)
        if config.ltc_form == "multi-exit":
            self.net = MultiExitNet(data.num_classes, in_channels=data.input_shape[0])
            self.cascade: Cascade = self.net.as_cascade()
        else:
            self.net = None
            self.cascade = build_cascade(config.cascade, data.input_shape, data.num_classes)
        self.cascade.to(self.device)
        self.costs = self.cascade.costs()  # a max-softmax threshold costs no MACs
        self.rule: LtcThresholdRule | None = None
        self.augment_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.progress: dict[str, Any] | None = None  # {"part", "fit"} of the last epoch

    def train(self, after_epoch: Callable[[], None] | None = None) -> None:
        """Eq. (5) for separate models or eq. (6) for the multi-exit net, then fit thresholds.

        Continues from ``self.progress`` (set by :meth:`load`); ``after_epoch`` is called
        after every epoch of every model, with ``self.progress`` updated (to checkpoint).
        """
        c = self.config
        args = (self.data.train, c.ltc_cost, c.ltc_weight, c.pretrain_epochs, c.lr, c.batch_size)
        spec = OptimizerSpec(c.optimizer, c.weight_decay, tuple(c.lr_milestones), c.lr_gamma)

        def augment(batch: torch.Tensor) -> torch.Tensor:
            return random_crop_flip(batch, pad=4, flip=True, generator=self.augment_generator)

        def record(progress: dict[str, Any]) -> None:
            self.progress = progress
            if after_epoch is not None:
                after_epoch()

        kwargs = {
            "seed": c.seed,
            "spec": spec,
            "augment": augment if c.augment else None,
            "resume": self.progress,
            "after_epoch": record,
        }
        if self.net is not None:
            train_ltc_multi_exit(self.net, *args, **kwargs)
        else:
            train_ltc_cascade(self.cascade, *args, **kwargs)
        val = self.outputs("val")
        self.rule = fit_ltc_thresholds(val.probs, val.labels, c.ltc_epsilon, self.costs)

    def outputs(self, split: str) -> CascadeOutputs:
        """Cached softmaxes of every exit on a split."""
        part = self.data.split(split)
        return self.cascade.outputs(part.x, part.y, self.costs)

    def evaluate(self, split: str) -> dict[str, Any]:
        """The thresholded cascade on a split."""
        outputs = self.outputs(split)
        return evaluate_exits(outputs, first_stop(stop_decisions(self.rule, outputs.probs)))

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: config, weights, training progress and (once fitted) thresholds."""
        return {
            "config": self.config.to_dict(),
            "alpha": None,
            "agent": "ltc",
            "cascade": self.cascade.state_dict(),
            "progress": self.progress,
            "augment_generator": self.augment_generator.get_state(),
            "thresholds": None if self.rule is None else self.rule.thresholds,
        }

    @property
    def finished(self) -> bool:
        """Whether training and the threshold fit are done."""
        return self.rule is not None

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore a run: a finished one's weights and thresholds, or where training stopped."""
        self.cascade.load_state_dict(checkpoint["cascade"])
        self.progress = checkpoint.get("progress")
        if checkpoint.get("augment_generator") is not None:
            self.augment_generator.set_state(checkpoint["augment_generator"].cpu())
        thresholds = checkpoint.get("thresholds")
        self.rule = None if thresholds is None else LtcThresholdRule(thresholds)


def _as_float(data: DataSplits) -> DataSplits:
    """LtC trains on whole tensors: normalise uint8 images once."""
    if data.train.x.dtype != torch.uint8:
        return data
    stats = NORMALISATION[data.name]
    return DataSplits(
        data.name,
        *(Split(to_float(s.x, *stats), s.y) for s in (data.train, data.val, data.test)),
        num_classes=data.num_classes,
    )


def train_ltc(
    config: TrainConfig, run_dir: Path, resume: bool = False, show_progress: bool = False
) -> dict[str, Any]:
    """Train (or continue), fit, evaluate and write the run directory; returns the test metrics.

    The checkpoint is written atomically after every epoch of every model. SIGINT or
    SIGTERM stop the run after the current epoch is saved (``TrainingInterrupted``);
    ``resume=True`` continues it from ``run_dir``.
    """
    run = LtcRun(config)
    if resume:
        run.load(load_checkpoint(run_dir, map_location=run.device))
    interrupted = {"signal": None}

    def on_signal(signum, frame):
        interrupted["signal"] = signum

    epochs = config.pretrain_epochs
    parts = 1 if run.net is not None else run.cascade.num_stages
    done = (
        0 if run.progress is None else run.progress["part"] * epochs + run.progress["fit"]["epoch"]
    )
    progress = tqdm(
        total=parts * epochs,
        initial=done,
        desc="LtC epochs (all models)",
        disable=not show_progress or run.finished,
        leave=False,
    )

    def save_epoch() -> None:
        save_atomic(run.state_dict(), run_dir / CHECKPOINT_NAME)
        progress.update(1)
        if interrupted["signal"] is not None:
            raise TrainingInterrupted(
                f"stopped by signal {interrupted['signal']} after a saved epoch; "
                f"continue with --resume {run_dir}"
            )

    if not run.finished:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            run.train(after_epoch=save_epoch)
        finally:
            progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        save_atomic(run.state_dict(), run_dir / CHECKPOINT_NAME)
    test = run.evaluate("test")
    metrics = {
        "alpha": None,
        "agent": "ltc",
        **test,
        "thresholds": run.rule.thresholds,
        "single_classifiers": single_classifier_metrics(run.outputs("test"), run.cascade.names),
        "val": run.evaluate("val"),
        "costs": run.costs.as_dict(),
        "stage_names": run.cascade.names,
    }
    writer = SummaryWriter(str(run_dir))
    for split, values in (("val", metrics["val"]), ("test", test)):
        for key in ("accuracy", "mean_macs", "macs_share"):
            writer.add_scalar(f"{split}/{key}", values[key], config.pretrain_epochs)
    writer.add_hparams(
        {
            "agent": "ltc",
            "ltc_cost": config.ltc_cost,
            "ltc_weight": config.ltc_weight,
            "ltc_epsilon": config.ltc_epsilon,
            "ltc_form": config.ltc_form,
            "seed": config.seed,
        },
        {"hparam/accuracy": test["accuracy"], "hparam/macs_share": test["macs_share"]},
        run_name=".",
    )
    writer.close()
    return metrics
