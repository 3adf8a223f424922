"""One training run: pre-train the classifiers, train the stopping policy, evaluate on test."""

from __future__ import annotations

import contextlib
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from policycascade.agents import ReinforceAgent, expected_return, policy_gradient_variance
from policycascade.agents.rules import stop_decisions
from policycascade.agents.thresholds import ThresholdSearch
from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_atomic,
    state_dict_mismatch,
)
from policycascade.config import TrainConfig
from policycascade.data import NORMALISATION, DataSplits, load_dataset, to_float
from policycascade.distributed import broadcast_buffers, current_context
from policycascade.evaluation import ensemble_predictions, evaluate_exits, first_stop
from policycascade.jsonio import write_json
from policycascade.models import build_cascade
from policycascade.optimizers import build_optimizer
from policycascade.runtime import resolve_device, seed_everything
from policycascade.supervised import batches, cross_entropy_all_stages


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the last finished epoch is safely checkpointed."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


def evaluate_learned_policy(
    agent: ReinforceAgent, outputs: CascadeOutputs, ensemble: bool = False
) -> dict[str, Any]:
    """Deterministic evaluation: stop where the stop probability is at least 1/2."""
    stop_probs = agent.stop_probs(outputs.probs)
    exit_stage = first_stop(stop_probs >= 0.5)
    predictions = ensemble_predictions(outputs.probs, stop_probs, exit_stage) if ensemble else None
    return evaluate_exits(outputs, exit_stage, predictions)


def single_classifier_metrics(outputs: CascadeOutputs, names: list[str]) -> list[dict[str, Any]]:
    """Each classifier alone: its accuracy and its own MACs (no earlier stage, no policy)."""
    correct = (outputs.probs.argmax(-1) == outputs.labels.unsqueeze(1)).double().mean(0)
    costs = outputs.costs
    return [
        {
            "name": name,
            "accuracy": float(correct[t]),
            "mean_macs": float(costs.alone_macs[t]),
            "macs_share": costs.alone_macs[t] / costs.reference_macs,
        }
        for t, name in enumerate(names)
    ]


WARM_START_STEPS = 500  # full-batch Adam steps imitating the threshold rule (about 1 s on digits)
WARM_START_LR = 1e-2


class Trainer:
    """Trains one (config, alpha) pair into ``run_dir``; ``resume=True`` continues it."""

    def __init__(
        self, config: TrainConfig, alpha: float, run_dir: Path, show_progress: bool = True
    ):
        self.config, self.alpha, self.run_dir = config, float(alpha), Path(run_dir)
        self.dist = current_context()
        self.show_progress = show_progress and self.dist.is_main
        self.device = resolve_device(config.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        seed_everything(config.seed, config.deterministic)
        self.data: DataSplits = load_dataset(
            config.dataset, config.seed, config.data_dir, config.download
        )
        self.cascade: Cascade = build_cascade(
            config.cascade, self.data.input_shape, self.data.num_classes
        ).to(self.device)
        if config.channels_last:
            self.cascade.to(memory_format=torch.channels_last)
        self.agent = ReinforceAgent(
            self.cascade.num_stages,
            self.data.num_classes,
            self.alpha,
            loss=config.loss,
            baseline=config.baseline,
            rollouts=config.rollouts,
            policy_hidden=config.policy_hidden,
            train_classifiers=not config.freeze_classifiers,
            label_estimator=config.label_estimator,
            entropy_weight=config.entropy_weight,
            policy_gradient=config.policy_gradient,
            policy_inputs=config.policy_inputs,
        ).to(self.device)
        self.costs = self.cascade.costs(self.agent.policy.policy_macs())
        # Training forwards go through DDP when several processes train together.
        self.train_cascade: torch.nn.Module = self.cascade
        if self.dist.enabled:
            self.train_cascade = torch.nn.parallel.DistributedDataParallel(self.cascade)
        self.cumulative_costs = torch.tensor(
            np.cumsum(self.costs.stage_costs), dtype=torch.float32, device=self.device
        )
        self.classifier_optimizer = self._classifier_optimizer()
        self.classifier_schedule = torch.optim.lr_scheduler.MultiStepLR(
            self.classifier_optimizer, milestones=config.lr_milestones, gamma=config.lr_gamma
        )
        self.policy_optimizer = build_optimizer(
            config.policy_optimizer, self.agent.parameters(), config.policy_lr
        )
        self.policy_schedule = torch.optim.lr_scheduler.StepLR(
            self.policy_optimizer,
            step_size=config.policy_lr_decay_every,
            gamma=config.policy_lr_decay,
        )
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.epoch = 0  # finished epochs, pre-training included
        self.history: list[dict[str, float]] = []
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _classifier_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return build_optimizer(c.optimizer, self.cascade.parameters(), c.lr, c.weight_decay)

    @property
    def total_epochs(self) -> int:
        """Pre-training plus REINFORCE epochs."""
        return self.config.pretrain_epochs + self.config.epochs

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: models, optimisers, RNG states, config."""
        return {
            "config": self.config.to_dict(),
            "alpha": self.alpha,
            "epoch": self.epoch,
            "stage_names": self.cascade.names,
            "classifier_macs": self.costs.classifier_macs,
            "cascade": self.cascade.state_dict(),
            "agent": self.agent.state_dict(),
            "classifier_optimizer": self.classifier_optimizer.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "policy_schedule": self.policy_schedule.state_dict(),
            "classifier_schedule": self.classifier_schedule.state_dict(),
            "history": self.history,
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
        """Write the checkpoint atomically (main process only)."""
        if self.dist.is_main:
            save_atomic(self.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore a checkpoint written by :meth:`save` of the same configuration.

        A checkpoint of another cascade, stopping policy or format raises a
        ValueError that names what does not match.
        """
        missing = [key for key in self.state_dict() if key not in checkpoint]
        if missing:
            raise ValueError(
                f"checkpoint in {self.run_dir} lacks {missing}: it was not written by this "
                "version of policycascade's REINFORCE trainer"
            )
        if checkpoint["classifier_macs"] != self.costs.classifier_macs:
            raise ValueError(
                f"checkpoint in {self.run_dir} is of another cascade: its classifiers cost "
                f"{checkpoint['classifier_macs']} MACs, this config's {self.costs.classifier_macs}"
            )
        for name, module in (("cascade", self.cascade), ("agent", self.agent)):
            try:
                module.load_state_dict(checkpoint[name])
            except RuntimeError as error:
                raise ValueError(
                    f"checkpoint in {self.run_dir} does not fit this config's {name} (written "
                    f"by another version or configuration?): {state_dict_mismatch(error)}"
                ) from None
        self.classifier_optimizer.load_state_dict(checkpoint["classifier_optimizer"])
        self.policy_optimizer.load_state_dict(checkpoint["policy_optimizer"])
        self.policy_schedule.load_state_dict(checkpoint["policy_schedule"])
        self.classifier_schedule.load_state_dict(checkpoint["classifier_schedule"])
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

    # -- epochs ------------------------------------------------------------------------------

    def _set_joint_lr(self) -> None:
        """Scale the classifiers' lr (and the schedule's base) once, when joint training starts."""
        for group in self.classifier_optimizer.param_groups:
            group["lr"] *= self.config.joint_lr_scale
        self.classifier_schedule.base_lrs = [
            lr * self.config.joint_lr_scale for lr in self.classifier_schedule.base_lrs
        ]

    def _split_on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's images and labels on the device, copied there once per run."""
        if split not in self._on_device:
            data = self.data.split(split)
            self._on_device[split] = (data.x.to(self.device), data.y.to(self.device))
        return self._on_device[split]

    def _inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the classifiers' passes when ``precision`` is ``bf16``."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _classify(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(batch, stage, class) logits in fp32, the forward pass at the configured precision."""
        with self._autocast():
            return module(x).float()

    def _pretrain_epoch(self) -> dict[str, float]:
        x, y = self._split_on_device("train")
        self.cascade.train()
        total, count = 0.0, 0
        for step, idx in enumerate(batches(len(y), self.config.batch_size, self.shuffle_generator)):
            idx = self.dist.shard(idx).to(self.device)
            logits = self._classify(self.train_cascade, self._inputs(x[idx], True))
            loss = cross_entropy_all_stages(logits, y[idx])
            self._check_finite(loss, "pre-training loss", step, logits)
            self.classifier_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._check_finite_gradients(step)
            self.classifier_optimizer.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        return {"pretrain/loss": total / count}

    def _reinforce_epoch(self) -> dict[str, float]:
        """One REINFORCE epoch over the training batches.

        With ``policy_split="train"`` each batch drives both the classifiers and
        the stopping modules (Guan et al.). With ``"val"`` the two streams are
        kept apart: classifiers learn (REINFORCE label term + cross-entropy) only
        from training batches, and the stopping modules only from the current
        classifiers' outputs on held-out batches, which they never train on.
        """
        c = self.config
        x, y = self._split_on_device("train")
        held_out = c.policy_split != "train"
        px, py = self._split_on_device(c.policy_split)
        joint = not c.freeze_classifiers
        train_batches = batches(len(y), c.batch_size, self.shuffle_generator)
        policy_batches = train_batches
        if held_out:  # cycle the held-out split alongside the training batches
            policy_batches = []
            while len(policy_batches) < len(train_batches):
                policy_batches += batches(len(py), c.batch_size, self.shuffle_generator)
        # Frozen classifiers: their outputs on the policy split are computed once.
        frozen_logits = self._eval_logits(px) if not joint else None
        sums: dict[str, float] = {}
        count = 0
        last_step = None
        for step_index, (idx, policy_idx) in enumerate(
            zip(train_batches, policy_batches, strict=False)
        ):
            idx = self.dist.shard(idx).to(self.device)
            policy_idx = self.dist.shard(policy_idx).to(self.device)
            self.policy_optimizer.zero_grad(set_to_none=True)
            self.classifier_optimizer.zero_grad(set_to_none=True)
            supervised = x.new_zeros(())
            if joint:
                self.cascade.train()
                logits = self._classify(self.train_cascade, self._inputs(x[idx], True))
                supervised = cross_entropy_all_stages(logits, y[idx])
                step = self.agent(logits, y[idx], self.cumulative_costs, self.sample_generator)
                classifier_loss = c.supervised_weight * supervised + step.loss
                if not held_out:
                    classifier_loss = classifier_loss + step.baseline_loss
                self._check_finite(classifier_loss, "joint training loss", step_index, logits)
                classifier_loss.backward()
            if held_out or not joint:
                if joint:  # the policy's gradient comes from held-out outputs only
                    self.agent.zero_grad(set_to_none=True)
                    policy_logits = self._eval_logits(px[policy_idx])
                else:
                    policy_logits = frozen_logits[policy_idx]
                step = self.agent(
                    policy_logits, py[policy_idx], self.cumulative_costs, self.sample_generator
                )
                policy_loss = step.loss + step.baseline_loss
                self._check_finite(policy_loss, "REINFORCE loss", step_index, policy_logits)
                policy_loss.backward()
            self.dist.average_gradients(self.agent)
            self._check_finite_gradients(step_index)
            self.policy_optimizer.step()
            if joint:
                self.classifier_optimizer.step()
            n = len(policy_idx)
            for key, value in (
                ("train/reward", step.returns.mean()),
                ("train/loss_policy", step.loss),
                ("train/loss_baseline", step.baseline_loss),
                ("train/loss_supervised", supervised),
                ("train/advantage_std", step.advantages.std()),
            ):
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * n
            count += n
            last_step = step
        metrics = {key: value / count for key, value in sums.items()}
        metrics["train/grad_variance"] = policy_gradient_variance(
            self.agent.policy,
            last_step.probs,
            last_step.exit_stage,
            last_step.advantages.reshape(-1),
        )
        metrics["policy/lr"] = self.policy_optimizer.param_groups[0]["lr"]
        self.policy_schedule.step()
        return metrics

    def _warm_start_policy(self) -> dict[str, float]:
        """Fit the stopping modules to the max-softmax rule with the best reward at this alpha.

        The rule is fitted on the policy split's outputs of the current classifiers
        (``ThresholdSearch.for_reward``); the modules then imitate its decisions by
        cross-entropy, so REINFORCE starts from the threshold rule instead of from a
        random policy. Returns how often the modules agree with the rule afterwards.
        """
        x, y = self._split_on_device(self.config.policy_split)
        probs = self._eval_logits(x).softmax(-1)
        rule = ThresholdSearch(probs, y, self.costs, "max-softmax").for_reward(self.alpha)
        target = stop_decisions(rule, probs.cpu())[:, :-1].to(self.device, probs.dtype)
        policy = self.agent.policy
        optimizer = build_optimizer("adam", policy.parameters(), WARM_START_LR)
        for _ in range(WARM_START_STEPS):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(policy(probs), target).backward()
            optimizer.step()
        with torch.no_grad():
            agreement = ((policy(probs) >= 0).to(probs.dtype) == target).to(probs.dtype).mean()
        return {
            "policy/warm_start_agreement": float(agreement),
            "policy/warm_start_stop_share": float(target.mean()),
        }

    @torch.no_grad()
    def _eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.cascade.training
        self.cascade.eval()
        logits = torch.cat(
            [
                self._classify(self.cascade, self._inputs(x[i : i + 1024]))
                for i in range(0, len(x), 1024)
            ]
        )
        self.cascade.train(was_training)
        return logits

    def _kept_checkpoint(self) -> str:
        """What a failed run leaves behind, for the non-finite errors."""
        if self.epoch == 0:
            return f"No checkpoint was written: the run failed in its first epoch ({self.run_dir})."
        return f"The last good checkpoint (epoch {self.epoch}) in {self.run_dir} is kept."

    def _check_finite_gradients(self, step: int) -> None:
        """Stop before an optimiser step writes NaN/inf into the weights; name the module."""
        modules = [
            (f"classifier stage {t} ({name!r})", classifier)
            for t, (name, classifier) in enumerate(
                zip(self.cascade.names, self.cascade.classifiers, strict=True)
            )
        ] + [("stopping policy", self.agent)]
        grads = [p.grad for _, m in modules for p in m.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(_total_norm(grads))):
            return
        bad = next(
            name
            for name, module in modules
            if any(
                p.grad is not None and not torch.isfinite(p.grad).all() for p in module.parameters()
            )
        )
        raise NonFiniteError(
            f"gradients of the {bad} became non-finite in epoch {self.epoch + 1}, "
            f"step {step + 1}, with a finite loss; no optimiser step was taken. "
            f"{self._kept_checkpoint()}"
        )

    def _check_finite(
        self, value: torch.Tensor, what: str, step: int, logits: torch.Tensor
    ) -> None:
        """Stop with a message naming the epoch, the step and the first stage gone non-finite."""
        if torch.isfinite(value).all():
            return
        bad = [t for t in range(logits.shape[1]) if not torch.isfinite(logits[:, t]).all()]
        where = (
            f"classifier stage {bad[0]} ({self.cascade.names[bad[0]]!r}) produced non-finite logits"
            if bad
            else "all logits were finite"
        )
        raise NonFiniteError(
            f"{what} became {float(value.detach())} in epoch {self.epoch + 1}, "
            f"step {step + 1}: {where}. "
            f"{self._kept_checkpoint()}"
        )

    def outputs(self, split: str) -> CascadeOutputs:
        """Cached classifier outputs on a split, with this run's stage costs."""
        x, y = self._split_on_device(split)
        with self._autocast():
            return self.cascade.outputs(x, y, self.costs, transform=self._inputs)

    def evaluate(self, split: str) -> dict[str, Any]:
        """The learned policy on a split, plus its exact expected reward."""
        outputs = self.outputs(split)
        metrics = evaluate_learned_policy(self.agent, outputs, self.config.ensemble)
        with torch.no_grad():
            stop_probs = self.agent.stop_probs(outputs.probs)
            reward = expected_return(
                outputs.probs.clamp_min(1e-12).log(),
                stop_probs,
                outputs.labels,
                self.cumulative_costs,
                self.alpha,
                self.config.loss,
                sample_prediction=False,
            )
        metrics["expected_reward"] = float(reward.mean())
        return metrics

    # -- the run -----------------------------------------------------------------------------

    def run(self, writer: SummaryWriter | None) -> dict[str, Any]:
        """Train from ``self.epoch`` to the end, checkpointing after every epoch.

        ``writer`` is None on every process but the main one of a distributed run.
        """
        interrupted = {"signal": None}

        def on_signal(signum, frame):
            interrupted["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            progress = tqdm(
                range(self.epoch, self.total_epochs),
                initial=self.epoch,
                total=self.total_epochs,
                desc=f"alpha={self.alpha:g}",
                disable=not self.show_progress,
                leave=False,
            )
            for epoch in progress:
                if epoch == self.config.pretrain_epochs:
                    self._set_joint_lr()
                warm_start = {}
                if epoch == self.config.pretrain_epochs and self.config.policy_init != "random":
                    warm_start = self._warm_start_policy()
                if epoch < self.config.pretrain_epochs:
                    metrics = self._pretrain_epoch()
                else:
                    metrics = {**warm_start, **self._reinforce_epoch()}
                broadcast_buffers(self.dist, self.cascade)
                broadcast_buffers(self.dist, self.agent)
                val = self.evaluate("val")
                metrics.update(_tagged("val", val))
                metrics["train/lr_classifiers"] = self.classifier_optimizer.param_groups[0]["lr"]
                self.classifier_schedule.step()
                self.epoch = epoch + 1
                self.history.append({"epoch": epoch + 1, **metrics})
                self.save()
                if writer is not None:
                    for tag, value in metrics.items():
                        writer.add_scalar(tag, value, epoch + 1)
                    writer.flush()
                progress.set_postfix(acc=f"{val['accuracy']:.3f}", share=f"{val['macs_share']:.3f}")
                if interrupted["signal"] is not None:
                    raise TrainingInterrupted(
                        f"stopped by signal {interrupted['signal']} after epoch {epoch + 1}; "
                        f"continue with --resume {self.run_dir}"
                    )
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.final_metrics()

    def final_metrics(self) -> dict[str, Any]:
        """Test-split metrics of the learned policy and of each single classifier."""
        test_outputs = self.outputs("test")
        test = self.evaluate("test")
        val = self.evaluate("val")
        return {
            "alpha": self.alpha,
            **test,
            "single_classifiers": single_classifier_metrics(test_outputs, self.cascade.names),
            "val": val,
            "costs": self.costs.as_dict(),
            "stage_names": self.cascade.names,
            "epochs_trained": self.epoch,
        }


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """2-norm over all ``tensors``: non-finite as soon as any element is."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused call
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _tagged(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar TensorBoard tags for evaluation metrics (per-stage lists become one tag per stage)."""
    out = {}
    for key in ("accuracy", "mean_macs", "macs_share", "expected_reward"):
        out[f"{prefix}/{key}"] = float(metrics[key])
    for t, share in enumerate(metrics["exit_distribution"]):
        out[f"{prefix}/exit_share/stage{t}"] = float(share)
    return out


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` (NaN becomes null so the file stays valid JSON)."""
    write_json(run_dir / "metrics.json", metrics)


__all__ = [
    "NonFiniteError",
    "Trainer",
    "TrainingInterrupted",
    "evaluate_learned_policy",
    "load_checkpoint",
    "single_classifier_metrics",
    "write_metrics",
]
