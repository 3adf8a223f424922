"""Variance-reducing baselines for the REINFORCE estimator, each keeping it unbiased.

Every baseline maps the returns of a batch of rollouts, shape (rollout, sample),
to a baseline value per rollout that does not depend on that rollout's own
actions, so ``E[(R - b) * grad log p] = E[R * grad log p]`` holds exactly.
"""

from __future__ import annotations

import torch
from torch import nn

BASELINES = ("none", "moving-average", "optimal-constant", "value", "leave-one-out")


class Baseline(nn.Module):
    """Interface: ``forward`` returns (baseline values (M, B), auxiliary loss)."""

    min_rollouts = 1

    def forward(
        self, returns: torch.Tensor, score_sq_norms: torch.Tensor, first_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Baseline for each rollout; ``returns`` and ``score_sq_norms`` are (M, B)."""
        raise NotImplementedError


class NoBaseline(Baseline):
    """b = 0: plain REINFORCE."""

    def forward(self, returns, score_sq_norms, first_probs):
        return torch.zeros_like(returns), returns.new_zeros(())


class MovingAverageBaseline(Baseline):
    """b = exponential moving average of the mean return of earlier batches."""

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, returns, score_sq_norms, first_probs):
        baseline = self.value.to(returns.dtype, copy=True).expand_as(returns)
        mean = returns.detach().mean().to(self.value.dtype)
        # torch.where rather than an ``if``: reading the flag would wait for the device.
        updated = self.value * self.momentum + (1.0 - self.momentum) * mean
        self.value.copy_(torch.where(self.initialised, updated, mean))
        self.initialised.fill_(True)
        return baseline, returns.new_zeros(())


class OptimalConstantBaseline(Baseline):
    """The per-batch constant that minimises the estimator's variance (Guan et al. 3.3).

    For a scalar constant the variance of ``(R - b) g`` is smallest at
    ``b* = E[R |g|^2] / E[|g|^2]`` with ``g`` the score function. We take
    ``|g|^2`` with respect to the networks' output logits (stop logits and, when
    a label is sampled, class logits): exact for the output layer and cheap.
    Each rollout's ``b*`` is computed from the *other* rollouts of the batch
    (leave one out), so it is independent of that rollout and the estimate stays
    unbiased; with hundreds of rollouts per batch it differs from the all-in
    constant by O(1/batch).
    """

    def forward(self, returns, score_sq_norms, first_probs):
        weights = score_sq_norms.detach()
        weighted = returns.detach() * weights
        numerator = weighted.sum() - weighted
        denominator = weights.sum() - weights
        baseline = torch.where(
            denominator > 1e-12, numerator / denominator.clamp_min(1e-12), torch.zeros_like(returns)
        )
        return baseline, returns.new_zeros(())


class ValueBaseline(Baseline):
    """A learned state value b(s_0): an MLP on the first classifier's softmax, fitted by MSE.

    It depends only on the first observation, which no action influences, so it
    is a valid baseline for every decision of the episode.
    """

    def __init__(self, num_classes: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, returns, score_sq_norms, first_probs):
        value = self.net(first_probs.detach().to(self.net[0].weight.dtype)).squeeze(-1)  # (B,)
        target = returns.detach().to(value.dtype).mean(0)
        loss = torch.nn.functional.mse_loss(value, target)
        baseline = value.detach().to(returns.dtype).unsqueeze(0).expand_as(returns)
        return baseline, loss


class LeaveOneOutBaseline(Baseline):
    """b for one rollout = mean return of the other rollouts of the same sample (RLOO)."""

    min_rollouts = 2

    def forward(self, returns, score_sq_norms, first_probs):
        m = returns.shape[0]
        if m < 2:
            raise ValueError(f"the leave-one-out baseline needs rollouts >= 2, got {m}")
        detached = returns.detach()
        baseline = (detached.sum(0, keepdim=True) - detached) / (m - 1)
        return baseline, returns.new_zeros(())


def make_baseline(name: str, num_classes: int) -> Baseline:
    """The baseline called ``name`` (one of :data:`BASELINES`)."""
    if name == "none":
        return NoBaseline()
    if name == "moving-average":
        return MovingAverageBaseline()
    if name == "optimal-constant":
        return OptimalConstantBaseline()
    if name == "value":
        return ValueBaseline(num_classes)
    if name == "leave-one-out":
        return LeaveOneOutBaseline()
    raise ValueError(f"baseline must be one of {list(BASELINES)}, got {name!r}")
