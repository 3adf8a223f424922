"""One run of any algorithm: device, seeding, data, cascade and costs, epochs, checkpoints, metrics.

The harness owns everything a training run needs except the learning itself, which
an :class:`~policycascade.agents.algorithm.Algorithm` does one epoch at a time
(REINFORCE, Learning to Cascade). Every algorithm therefore gets the same
checkpoint format, resume, signal handling, NaN checks, logging and evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from policycascade.agents.algorithm import Algorithm
from policycascade.agents.thresholds import best_reward_rule
from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpoint import CHECKPOINT_NAME, save_atomic
from policycascade.config import TrainConfig
from policycascade.data import NORMALISATION, DataSplits, load_dataset, to_float
from policycascade.distributed import broadcast_buffers, current_context
from policycascade.evaluation import evaluate_exits, evaluate_rule
from policycascade.models import build_cascade
from policycascade.runtime import resolve_device, seed_everything
from policycascade.supervised import batches

CHECKPOINT_FORMAT = 2  # {format, config, alpha, algorithm, epoch, history, state, rng}
EVAL_BATCH = 1024


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the last finished epoch is safely checkpointed."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


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


class RunHarness:
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

    def build_cascade(self) -> Cascade:
        """The configured cascade family on the device (channels-last if configured)."""
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

    # -- NaN/inf checks ------------------------------------------------------------------------

    _deferred: _DeferredChecks | None = None  # inside check_finite_deferred(): the pending checks

    def optimise(
        self,
        loss: torch.Tensor,
        optimizers: Sequence[torch.optim.Optimizer],
        step: int,
        average: Sequence[torch.nn.Module] = (),
    ) -> None:
        """One optimiser step on ``loss``; no step writes NaN/inf into the weights.

        ``average`` lists modules outside DDP whose gradients the processes of a
        distributed run average. Inside :meth:`check_finite_deferred` a step whose
        loss or gradients are not finite is skipped on the device (fused optimisers'
        ``found_inf``, as ``torch.amp.GradScaler`` uses it) instead of synchronising.
        """
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for module in average:
            self.dist.average_gradients(module)
        params = [
            p for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None
        ]
        deferred = self._deferred
        if deferred is None or not all(o.defaults.get("fused") for o in optimizers):
            if deferred is not None:  # an unfused optimiser cannot skip on the device
                self._read_deferred_checks()
            self.check_finite_gradients(step, params)
            for optimizer in optimizers:
                optimizer.step()
            return
        if params:
            grads_ok = _finite_flags(params)
            error = functools.partial(self._non_finite_gradients, step, params, grads_ok)
            deferred.checks.append(_FiniteCheck(grads_ok.all(), error))
        pending = [c.ok for c in deferred.checks[deferred.unstepped :]]
        if not pending:  # nothing checked this step
            pending = [torch.ones((), dtype=torch.bool, device=loss.device)]
        step_ok = torch.stack(pending).all()
        found_inf = (~step_ok).float()  # 1: the fused kernels leave weights and state alone
        for optimizer in optimizers:
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        deferred.unstepped = len(deferred.checks)
        if deferred.unstepped >= 2 * FINITE_CHECKS_EVERY:  # a loss and a gradient check per step
            self._read_deferred_checks()

    @contextlib.contextmanager
    def check_finite_deferred(self, enabled: bool | None = None) -> Iterator[None]:
        """Read the NaN/inf checks of :meth:`check_finite` and :meth:`optimise` in bulk.

        Inside, a check records flags on the device instead of synchronising with the
        host every step; they are read every ``FINITE_CHECKS_EVERY`` steps and on leaving.
        A failed step's update is skipped on the device, so none reaches the weights,
        and the error raised on reading names the first failed check, as the immediate
        check would have (the steps after it ran in vain). Optimisers without a fused
        kernel are checked before each of their steps, as outside. ``enabled`` defaults
        to off on the CPU, where a check waits for nothing and recording costs more
        (digits joint step: about 0.1 ms more per step, measured side by side). Inside
        another deferring block it changes nothing: the outer block reads the checks.
        """
        if self._deferred is not None:
            yield
            return
        if enabled is None:
            enabled = self.device.type != "cpu"
        previous, self._deferred = self._deferred, _DeferredChecks() if enabled else None
        try:
            yield
            if enabled:
                self._read_deferred_checks()
        finally:
            self._deferred = previous

    def _read_deferred_checks(self) -> None:
        deferred = self._deferred
        if not deferred.checks:
            return
        checks, deferred.checks, deferred.unstepped = deferred.checks, [], 0
        ok = torch.stack([c.ok for c in checks])
        if bool(ok.all()):
            return
        raise checks[int(ok.to(torch.uint8).argmin())].error()

    def check_finite(
        self,
        value: torch.Tensor,
        what: str,
        step: int,
        logits: torch.Tensor,
        stages: Sequence[int] | None = None,
    ) -> None:
        """Stop with a message naming the epoch, the step and the first stage gone non-finite.

        ``logits`` is (batch, S, C) for the stages ``stages`` (default: every stage).
        Inside :meth:`check_finite_deferred` the check is recorded and read later.
        """
        value, logits = value.detach(), logits.detach()
        ok = torch.isfinite(value).all()
        if self._deferred is None:
            if ok:
                return
            raise self._non_finite_loss(value, what, step, torch.isfinite(logits), stages)
        stage_ok = torch.isfinite(logits).all(2).all(0)  # (S,)
        error = functools.partial(self._non_finite_loss, value, what, step, stage_ok, stages)
        self._deferred.checks.append(_FiniteCheck(ok, error))

    def _non_finite_loss(
        self,
        value: torch.Tensor,
        what: str,
        step: int,
        finite: torch.Tensor,
        stages: Sequence[int] | None,
    ) -> NonFiniteError:
        """The error of a non-finite loss; ``finite`` flags the logits (B, S, C) or stages (S,)."""
        stage_ok = finite.all(2).all(0) if finite.ndim == 3 else finite
        stages = list(stages) if stages is not None else list(range(len(stage_ok)))
        bad = [s for s, good in zip(stages, stage_ok.tolist(), strict=True) if not good]
        where = (
            f"classifier stage {bad[0]} ({self.cascade.names[bad[0]]!r}) produced non-finite logits"
            if bad
            else "all logits were finite"
        )
        return NonFiniteError(
            f"{what} became {float(value)} in epoch {self.epoch + 1}, "
            f"step {step + 1}: {where}. {self._kept_checkpoint()}"
        )

    def check_finite_gradients(
        self, step: int, params: Sequence[torch.nn.Parameter] | None = None
    ) -> None:
        """Stop before an optimiser step writes NaN/inf into the weights; name the module.

        ``params`` (default: every module's) are those about to be stepped.
        """
        if params is None:
            params = [p for _, m in self.algorithm.modules() for p in m.parameters()]
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        ok = _finite_flags(params)
        if bool(ok.all()):
            return
        raise self._non_finite_gradients(step, params, ok)

    def _non_finite_gradients(
        self, step: int, params: Sequence[torch.nn.Parameter], ok: torch.Tensor
    ) -> NonFiniteError:
        bad_ids = {id(p) for p, good in zip(params, ok.tolist(), strict=True) if not good}
        bad = next(
            (
                name
                for name, module in self.algorithm.modules()
                if any(id(p) in bad_ids for p in module.parameters())
            ),
            "optimised parameters",
        )
        return NonFiniteError(
            f"gradients of the {bad} became non-finite in epoch {self.epoch + 1}, "
            f"step {step + 1}, with a finite loss; no optimiser step was taken. "
            f"{self._kept_checkpoint()}"
        )

    def _kept_checkpoint(self) -> str:
        if self.epoch == 0:
            return f"No checkpoint was written: the run failed in its first epoch ({self.run_dir})."
        return f"The last good checkpoint (epoch {self.epoch}) in {self.run_dir} is kept."

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
        test_outputs = self.outputs("test")
        extras = self.algorithm.final_extras()
        if self.alpha is not None:  # what the user would otherwise deploy at this alpha
            val = self.outputs("val")
            free = val.costs.with_policy_macs([0] * val.num_stages)
            rule = best_reward_rule(val.probs, val.labels, free, self.alpha)
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
            "val": self.evaluate("val"),
            "costs": self.costs.as_dict(),
            "stage_names": self.cascade.names,
            "epochs_trained": self.epoch,
        }

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The one checkpoint format of every algorithm."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "alpha": self.alpha,
            "algorithm": self.config.agent,
            "epoch": self.epoch,
            "history": self.history,
            "classifier_macs": self.costs.classifier_macs,
            "state": self.algorithm.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "shuffle": self.shuffle_generator.get_state(),
                "sample": self.sample_generator.get_state(),
            },
        }

    def save(self) -> None:
        """Write the checkpoint atomically (main process only), creating ``run_dir`` if needed."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_atomic(self.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore a checkpoint of this configuration (see ``policycascade.runs`` for checks)."""
        if checkpoint["classifier_macs"] != self.costs.classifier_macs:
            raise ValueError(
                f"checkpoint in {self.run_dir} is of another cascade: its classifiers cost "
                f"{checkpoint['classifier_macs']} MACs, this config's {self.costs.classifier_macs}"
            )
        self.algorithm.load_state_dict(checkpoint["state"])
        self.history = list(checkpoint["history"])
        self.epoch = int(checkpoint["epoch"])
        rng = checkpoint["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        # Generator states are CPU byte tensors whatever the device (a checkpoint loaded
        # with map_location="cuda" has moved them there).
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
        self.shuffle_generator.set_state(rng["shuffle"].cpu())
        self.sample_generator.set_state(rng["sample"].cpu())

    @property
    def finished(self) -> bool:
        """Whether every epoch of the algorithm has been trained."""
        return self.epoch >= self.algorithm.num_epochs

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


FINITE_CHECKS_EVERY = 100  # steps between reads of deferred NaN/inf checks


@dataclass
class _FiniteCheck:
    """A NaN/inf check recorded on the device; its error is built only if it failed."""

    ok: torch.Tensor  # 0-d bool
    error: Callable[[], NonFiniteError]


@dataclass
class _DeferredChecks:
    checks: list[_FiniteCheck] = field(default_factory=list)
    unstepped: int = 0  # checks[unstepped:] belong to the step not yet taken


def _finite_flags(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether each parameter's gradient is finite, (P,) bool, from one fused norm call."""
    grads = [p.grad for p in params]
    if hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(grads)
    else:
        norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.isfinite(torch.stack(norms))


def _tagged(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar TensorBoard tags for evaluation metrics (per-stage lists become one tag per stage)."""
    out = {}
    for key in ("accuracy", "mean_macs", "macs_share", "expected_reward"):
        if key in metrics:
            out[f"{prefix}/{key}"] = float(metrics[key])
    for t, share in enumerate(metrics["exit_distribution"]):
        out[f"{prefix}/exit_share/stage{t}"] = float(share)
    return out
