"""REINFORCE as a run-harness algorithm: cross-entropy pre-training, then the stopping policy.

Guan et al. 2018: after ``pretrain_epochs`` of cross-entropy, each REINFORCE epoch
trains the stopping modules (and, unless frozen, the classifiers) on the reward
-loss - alpha * cost. With ``policy_split="val"`` the two data streams stay apart:
classifiers learn only from training batches, the stopping modules only from the
current classifiers' outputs on held-out batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policycascade.agents.algorithm import Algorithm
from policycascade.agents.reinforce import (
    ReinforceAgent,
    ReinforceStep,
    expected_return,
    policy_gradient_variance,
)
from policycascade.agents.reinforce_optim import (
    JoinedOptimizer,
    build_optimizers,
    scale_lr,
    step_optimizers,
)
from policycascade.agents.reinforce_warm_start import warm_start_policy
from policycascade.agents.stopping_policy import LearnedRule
from policycascade.cascade import CascadeOutputs
from policycascade.compiled import maybe_compile
from policycascade.distributed import broadcast_parameters
from policycascade.supervised import cross_entropy_all_stages, trained_classes_of

if TYPE_CHECKING:
    from policycascade.harness import RunHarness

__all__ = [
    "STEP_SCALARS",
    "JoinedOptimizer",
    "ReinforceTraining",
    "build_agent",
    "epoch_batches",
    "step_scalars",
    "with_baseline_loss",
    "without_parameter_gradients",
]


@contextlib.contextmanager
def without_parameter_gradients(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with its parameters frozen: gradients still flow through it to its inputs."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def epoch_batches(
    harness: RunHarness, policy_split: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(training batch, policy batch) pairs; a held-out policy split is cycled alongside."""
    train_batches = harness.train_batches(harness.num_samples("train"))
    if policy_split == "train":
        return list(zip(train_batches, train_batches, strict=True))
    n_policy = harness.num_samples(policy_split)
    policy_batches: list[torch.Tensor] = []
    while len(policy_batches) < len(train_batches):
        policy_batches += harness.train_batches(n_policy)
    return list(zip(train_batches, policy_batches, strict=False))


def build_agent(harness: RunHarness, num_stages: int) -> ReinforceAgent:
    """The REINFORCE agent the run's settings describe, on the run's device."""
    r = harness.config.reinforce
    return ReinforceAgent(
        num_stages,
        harness.data.num_classes,
        harness.alpha,
        loss=r.loss,
        baseline=r.baseline,
        rollouts=r.rollouts,
        policy_hidden=r.policy_hidden,
        train_classifiers=not r.freeze_classifiers,
        policy_gradient=r.policy_gradient,
        policy_inputs=r.policy_inputs,
    ).to(harness.device)


class ReinforceTraining(Algorithm):
    """Pre-training epochs, then REINFORCE epochs; ends with the learned stopping policy."""

    name = "reinforce"

    def __init__(self, harness: RunHarness, train: bool = True):
        super().__init__(harness, train)
        if harness.alpha is None:
            raise ValueError("REINFORCE needs an alpha")
        self.settings = harness.config.reinforce
        self.cascade = harness.build_cascade()
        self.agent = build_agent(harness, self.cascade.num_stages)
        # Training forwards go through DDP when several processes train together, and through
        # torch.compile where configured (eager on failure, with a one-line notice).
        compile_, device = harness.config.compile, harness.device
        self.train_cascade = maybe_compile(
            harness.parallel(self.cascade), compile_, "the classifiers", device=device
        )
        self.agent_step = maybe_compile(self.agent, compile_, "the REINFORCE agent", device=device)
        self._cumulative_costs: tuple[Any, torch.Tensor] | None = None  # (costs, tensor)
        self._trained_classes = trained_classes_of(self.cascade)
        self._joined: JoinedOptimizer | None = None  # both optimisers, stepped as one
        self.classifier_optimizer = self.classifier_schedule = None
        self.policy_optimizer = self.policy_schedule = None
        if train:
            (
                self.classifier_optimizer,
                self.classifier_schedule,
                self.policy_optimizer,
                self.policy_schedule,
            ) = build_optimizers(harness, self.cascade, self.agent)

    @property
    def label(self) -> str:
        """``reinforce``, or ``reinforce-frozen`` when only the policy learns."""
        return self.name + ("-frozen" if self.settings.freeze_classifiers else "")

    @property
    def num_epochs(self) -> int:
        """Pre-training plus REINFORCE epochs."""
        return self.settings.pretrain_epochs + self.settings.epochs

    @property
    def classifier_epochs(self) -> int:
        """Pre-training, plus the joint epochs unless the classifiers are frozen."""
        r = self.settings
        return r.pretrain_epochs + (0 if r.freeze_classifiers else r.epochs)

    @property
    def cumulative_costs(self) -> torch.Tensor:
        """Normalised cost of exiting at each stage, (K,), on the device (built once per costs)."""
        costs = self.harness.costs
        if self._cumulative_costs is None or self._cumulative_costs[0] is not costs:
            cumulative = np.cumsum(costs.stage_costs)
            tensor = torch.tensor(cumulative, dtype=torch.float32, device=self.harness.device)
            self._cumulative_costs = (costs, tensor)
        return self._cumulative_costs[1]

    def policy_macs(self) -> list[int]:
        """The stopping modules' measured MACs."""
        return self.agent.policy.policy_macs()

    def rule(self) -> LearnedRule:
        """The learned policy, deterministic: stop where pi >= 1/2."""
        return LearnedRule(self.agent.policy, ensemble=self.settings.ensemble)

    def modules(self) -> list[tuple[str, nn.Module]]:
        """Each classifier by stage and name, then the stopping policy with its baseline."""
        named = [
            (f"classifier stage {t} ({name!r})", classifier)
            for t, (name, classifier) in enumerate(
                zip(self.cascade.names, self.cascade.classifiers, strict=True)
            )
        ]
        return [*named, ("stopping policy", self.agent)]

    def evaluation_extras(self, outputs: CascadeOutputs) -> dict[str, float]:
        """The policy's exact expected reward under its stochastic decisions."""
        with torch.no_grad():
            reward = expected_return(
                outputs.probs.clamp_min(1e-12).log(),
                self.agent.stop_probs(outputs.probs),
                outputs.labels,
                self.cumulative_costs,
                self.harness.alpha,
                self.settings.loss,
                sample_prediction=False,
            )
        return {"expected_reward": float(reward.mean())}

    # -- epochs ------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """A pre-training epoch, or a REINFORCE epoch once pre-training is over."""
        pretrain = self.settings.pretrain_epochs
        if epoch == pretrain:
            self._set_joint_lr()
        warm = self.settings.warm_start != "none"
        # after the last pre-training epoch; without pre-training, before the first REINFORCE one
        before = self._warm_start() if warm and pretrain == 0 and epoch == 0 else {}
        metrics = self._pretrain_epoch() if epoch < pretrain else self._reinforce_epoch()
        metrics.update(before)
        if warm and epoch == pretrain - 1:
            metrics.update(self._warm_start())
        metrics["train/lr_classifiers"] = self.classifier_optimizer.param_groups[0]["lr"]
        if epoch < pretrain or not self.settings.freeze_classifiers:
            # frozen classifiers are not stepped after pre-training: neither is their
            # schedule (torch warns about a schedule stepped before its optimiser)
            self.classifier_schedule.step()
        return metrics

    def _warm_start(self) -> dict[str, float]:
        """Imitate a rule fitted on the pre-trained classifiers' policy-split outputs.

        At the end of the last pre-training epoch, so the checkpoint written after it holds
        the imitated stopping modules (a resumed run continues from them). Draws nothing from
        the global random state: the joint phase sees the same random numbers as without it.
        """
        h, r = self.harness, self.settings
        with torch.no_grad():
            outputs = h.outputs(r.policy_split)
        generator = torch.Generator().manual_seed(h.config.seed)
        metrics = warm_start_policy(
            self.agent.policy,
            outputs,
            h.alpha,
            r.warm_start,
            r.warm_start_epochs,
            h.config.batch_size,
            generator,
            seed=h.config.seed,
        )
        # ranks saw outputs of classifiers whose batch-norm statistics are synced only after
        # the epoch: every rank continues from rank 0's imitated modules
        broadcast_parameters(h.dist, self.agent.policy)
        return metrics

    def final_extras(self) -> dict[str, Any]:
        """With a warm start: what its rule and the imitation reached (from the run's history)."""
        if self.settings.warm_start == "none":
            return {}
        logged = next((m for m in self.harness.history if "warm_start/agreement" in m), {})
        prefix = "warm_start/"
        values = {k.removeprefix(prefix): v for k, v in logged.items() if k.startswith(prefix)}
        # the imitated policy's own validation result, evaluated after that epoch
        values.update(
            {
                f"val_{k}": logged[f"val/{k}"]
                for k in ("accuracy", "macs_share")
                if f"val/{k}" in logged
            }
        )
        return {"warm_start": {"kind": self.settings.warm_start, **values}}

    def _set_joint_lr(self) -> None:
        """Scale the classifiers' lr (and the schedule's base) once, when joint training starts."""
        scale_lr(self.classifier_optimizer, self.classifier_schedule, self.settings.joint_lr_scale)

    def _pretrain_epoch(self) -> dict[str, float]:
        h = self.harness
        # Summed on the device and read once: no host synchronisation per step.
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        count = 0
        with h.check_finite_deferred():
            for step, idx in enumerate(h.train_batches(h.num_samples("train"))):
                idx = h.to_device(idx)
                loss = self.pretrain_step(idx, step)
                total += loss.detach().double() * len(idx)
                count += len(idx)
        return {"pretrain/loss": float(total) / count}

    def pretrain_step(self, idx: torch.Tensor, step: int = 0) -> torch.Tensor:
        """One cross-entropy step of every classifier on training samples ``idx``; its loss."""
        h = self.harness
        x, y = h.split_on_device("train")
        self.cascade.train()
        logits = h.classify(self.train_cascade, h.inputs(x[idx], True))
        loss = cross_entropy_all_stages(logits, y[idx], trained_classes_of(self.cascade))
        h.check_finite(loss, "pre-training loss", step, logits)
        h.optimise(loss, [self.classifier_optimizer], step)
        return loss

    def _reinforce_epoch(self) -> dict[str, float]:
        """One REINFORCE epoch; one optimiser step per batch for the policy and the classifiers."""
        h, r = self.harness, self.settings
        pairs = epoch_batches(self.harness, self.settings.policy_split)
        # Frozen classifiers: their outputs on the policy split are computed once.
        frozen_logits = None
        if r.freeze_classifiers:
            frozen_logits = h.eval_logits(self.cascade, h.split_on_device(r.policy_split)[0])
        # The logged scalars are summed on the device and read once: no host
        # synchronisation per step (nor for the NaN checks, read in bulk).
        sums = torch.zeros(len(STEP_SCALARS), dtype=torch.float64, device=h.device)
        count = 0
        with h.check_finite_deferred():
            for step_index, (idx, policy_idx) in enumerate(pairs):
                idx, policy_idx = h.to_device(idx), h.to_device(policy_idx)
                step, supervised = self.joint_step(idx, policy_idx, step_index, frozen_logits)
                n = len(policy_idx)
                sums += step_scalars(step, supervised) * n
                count += n
        metrics = dict(zip(STEP_SCALARS, (sums / count).tolist(), strict=True))
        metrics["train/grad_variance"] = (
            0.0  # the exact gradient samples nothing
            if self.agent.policy_gradient == "exact"
            else policy_gradient_variance(
                self.agent.policy, step.probs, step.exit_stage, step.advantages.reshape(-1)
            )
        )
        metrics["policy/lr"] = self.policy_optimizer.param_groups[0]["lr"]
        self.policy_schedule.step()
        return metrics

    def joint_step(
        self,
        idx: torch.Tensor,
        policy_idx: torch.Tensor,
        step_index: int = 0,
        frozen_logits: torch.Tensor | None = None,
    ) -> tuple[ReinforceStep, torch.Tensor]:
        """One REINFORCE step: training samples ``idx``, policy-split samples ``policy_idx``.

        Returns the policy's step and the classifiers' cross-entropy (0 when frozen).
        """
        h, r = self.harness, self.settings
        held_out, joint = r.policy_split != "train", not r.freeze_classifiers
        loss = supervised = None
        if joint:
            x, y = h.split_on_device("train")
            supervised, step, loss = self._classifier_loss(x[idx], y[idx], held_out, step_index)
        if held_out or not joint:
            px, py = h.split_on_device(r.policy_split)
            policy_logits = (
                frozen_logits[policy_idx]
                if frozen_logits is not None
                else h.eval_logits(self.cascade, px[policy_idx])
            )
            step = self.agent_step(
                policy_logits, py[policy_idx], self.cumulative_costs, h.sample_generator
            )
            policy_loss = with_baseline_loss(step.loss, step)
            h.check_finite(policy_loss, "REINFORCE loss", step_index, policy_logits)
            loss = policy_loss if loss is None else loss + policy_loss
        h.optimise(loss, self._step_optimizers(joint), step_index, average=[self.agent])
        if supervised is None:
            supervised = torch.zeros((), device=h.device)
        return step, supervised.detach()  # for the logs: the graph is not kept

    def _step_optimizers(self, joint: bool) -> list[torch.optim.Optimizer]:
        """What a joint step steps: the policy's optimiser, with the classifiers' one when joint.

        Both as one optimiser (one call, one ``zero_grad``) where they are of one kind.
        """
        if not joint:
            return [self.policy_optimizer]
        parts = [self.classifier_optimizer, self.policy_optimizer]
        self._joined, stepped = step_optimizers(self._joined, parts)
        return stepped

    def _classifier_loss(
        self, images: torch.Tensor, labels: torch.Tensor, held_out: bool, step_index: int
    ) -> tuple[torch.Tensor, ReinforceStep, torch.Tensor]:
        """The classifiers' joint loss on a training batch: cross-entropy plus the REINFORCE term.

        One log-softmax serves both. With a held-out policy split the stopping modules take
        no gradient from it.
        """
        h = self.harness
        self.cascade.train()
        logits = h.classify(self.train_cascade, h.inputs(images, True))
        log_probs = logits.log_softmax(-1)
        supervised = self._cross_entropy(logits, log_probs, labels)
        frozen = without_parameter_gradients(self.agent) if held_out else contextlib.nullcontext()
        with frozen:
            step = self.agent_step(
                log_probs, labels, self.cumulative_costs, h.sample_generator, normalised=True
            )
        weight = self.settings.supervised_weight
        loss = (supervised if weight == 1.0 else weight * supervised) + step.loss
        if not held_out:
            loss = with_baseline_loss(loss, step)
        h.check_finite(loss, "joint training loss", step_index, logits)
        return supervised, step, loss

    def _cross_entropy(
        self, logits: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """:func:`cross_entropy_all_stages` of ``logits``, from their log-softmax ``log_probs``."""
        if any(classes is not None for classes in self._trained_classes):  # specialists
            return cross_entropy_all_stages(logits, labels, self._trained_classes)
        k = log_probs.shape[1]
        return F.nll_loss(log_probs.flatten(0, 1), labels.repeat_interleave(k)) * k  # (b k) rows

    def saved_parts(self) -> dict[str, Any]:
        """The weights, optimisers and schedules a checkpoint holds (None: not training)."""
        return {
            "cascade": self.cascade,
            "agent": self.agent,
            "classifier_optimizer": self.classifier_optimizer,
            "policy_optimizer": self.policy_optimizer,
            "classifier_schedule": self.classifier_schedule,
            "policy_schedule": self.policy_schedule,
        }


STEP_SCALARS = (  # what step_scalars returns, in order
    "train/reward",
    "train/loss_policy",
    "train/loss_baseline",
    "train/loss_supervised",
    "train/advantage_std",
)


def step_scalars(step: ReinforceStep, supervised: torch.Tensor) -> torch.Tensor:
    """The logged scalars of one joint step (named by :data:`STEP_SCALARS`), float64, (5,)."""
    with torch.no_grad():
        values = (step.returns.mean(), step.loss, step.baseline_loss, supervised)
        advantages = step.advantages
        # a batch of one sample has no spread (and torch warns on its std)
        spread = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
        return torch.stack([*values, spread]).double()


def with_baseline_loss(loss: torch.Tensor, step: ReinforceStep) -> torch.Tensor:
    """``loss`` plus the baseline's fitting loss, where it has one (a constant 0 adds nothing)."""
    return loss + step.baseline_loss if step.baseline_loss.requires_grad else loss
