"""The REINFORCE run's optimisers: building them, the joint-training lr scale, and joining them.

Split out of :mod:`policycascade.agents.reinforce_training`, which re-exports these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from policycascade.optimizers import build_optimizer

if TYPE_CHECKING:
    from policycascade.harness import RunHarness

Schedule = torch.optim.lr_scheduler.LRScheduler


def build_optimizers(
    harness: RunHarness, cascade: nn.Module, agent: nn.Module
) -> tuple[torch.optim.Optimizer, Schedule, torch.optim.Optimizer, Schedule]:
    """The classifiers' optimiser and schedule, then the policy's optimiser and schedule."""
    c, r = harness.config, harness.config.reinforce
    classifier_optimizer = build_optimizer(c.optimizer, cascade.parameters(), c.lr, c.weight_decay)
    classifier_schedule = torch.optim.lr_scheduler.MultiStepLR(
        classifier_optimizer, milestones=c.lr_milestones, gamma=c.lr_gamma
    )
    policy_optimizer = build_optimizer(r.policy_optimizer, agent.parameters(), r.policy_lr)
    policy_schedule = torch.optim.lr_scheduler.StepLR(
        policy_optimizer, step_size=r.policy_lr_decay_every, gamma=r.policy_lr_decay
    )
    return classifier_optimizer, classifier_schedule, policy_optimizer, policy_schedule


def scale_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, scale: float) -> None:
    """Scale ``optimizer``'s lr and ``schedule``'s base lrs by ``scale``, once."""
    for group in optimizer.param_groups:
        group["lr"] *= scale
    schedule.base_lrs = [lr * scale for lr in schedule.base_lrs]


def step_optimizers(
    joined: JoinedOptimizer | None, parts: list[torch.optim.Optimizer]
) -> tuple[JoinedOptimizer | None, list[torch.optim.Optimizer]]:
    """The (possibly rebuilt) join of ``parts``, and what to step: the join, or ``parts``."""
    if joined is None or not joined.joins(parts):
        joined = JoinedOptimizer.of(parts)
    return joined, (parts if joined is None else [joined.optimizer])


class JoinedOptimizer:
    """Several optimisers of one kind stepped as one: one ``step`` and ``zero_grad`` call.

    The joined optimiser holds their very param-group dicts and reads and writes their
    per-parameter state, so each keeps its own lr schedule, ``state_dict`` and checkpoint
    layout, and an update is the one its own optimiser would make (each group is updated
    on its own, fused where it was). Loading a state into one of them replaces its groups:
    :meth:`joins` then says no, and the caller joins them anew.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parts: list[torch.optim.Optimizer]):
        self.optimizer, self._groups = optimizer, _groups_of(parts)

    @classmethod
    def of(cls, parts: list[torch.optim.Optimizer]) -> JoinedOptimizer | None:
        """``parts`` joined, or None where they are of different kinds (Adam and SGD)."""
        kind = type(parts[0])
        if any(type(part) is not kind for part in parts):
            return None
        groups = _groups_of(parts)
        joined = kind([{"params": group["params"]} for group in groups], **parts[0].defaults)
        joined.param_groups = groups
        joined.state = _OwnersState(parts)
        joined.defaults = {**joined.defaults, "fused": all(p.defaults.get("fused") for p in parts)}
        for part in parts:  # their schedules see them stepped (torch warns otherwise)
            part._opt_called = True
        return cls(joined, parts)

    def joins(self, parts: list[torch.optim.Optimizer]) -> bool:
        """Whether this still steps exactly the param groups of ``parts``."""
        groups = _groups_of(parts)
        return len(groups) == len(self._groups) and all(
            a is b for a, b in zip(groups, self._groups, strict=True)
        )


def _groups_of(optimizers: list[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    return [group for optimizer in optimizers for group in optimizer.param_groups]


class _OwnersState(dict):
    """Per-parameter optimiser state, the very dicts of the optimisers that own the parameters.

    Each is looked up in its owner on first use (which creates it there, as the owner's own
    step would) and read from here after that.
    """

    def __init__(self, owners: list[torch.optim.Optimizer]):
        super().__init__()
        self._state_of = {p: o.state for o in owners for g in o.param_groups for p in g["params"]}

    def __missing__(self, param: torch.Tensor) -> dict[str, Any]:
        state = self[param] = self._state_of[param][param]
        return state
