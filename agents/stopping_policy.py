"""The learned stopping policy: one small MLP per stage that reads the stage's softmax."""

from __future__ import annotations

import torch
from torch import nn

from policycascade.costs import count_macs


class StoppingModule(nn.Sequential):
    """Three fully connected layers with ReLU between them -> the logit of *stop*.

    Guan et al. section 4.3 (64 hidden units on CIFAR, 256 on ImageNet). One
    logit through a sigmoid is the same distribution as their 2-way softmax.
    """

    def __init__(self, num_classes: int, hidden: int = 64):
        super().__init__(
            nn.Linear(num_classes, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


LOG_PROB_FLOOR = -20.0  # log-probabilities below this (p < 2e-9) read as the floor
LOG_PROB_SCALE = 10.0  # inputs are log p / 10, about [-2, 0]


def policy_features(probs: torch.Tensor) -> torch.Tensor:
    """What a stopping module reads: the softmax on a (clamped, scaled) log scale.

    Same information as the probabilities, but confidences such as 0.99 and
    0.9999, which decide stopping at small alpha, are far apart on this scale
    and nearly equal on the linear one (measured on digits: modules fed raw
    probabilities collapsed to one constant decision for every sample).
    """
    return probs.clamp_min(1e-30).log().clamp_min(LOG_PROB_FLOOR) / LOG_PROB_SCALE


class StoppingPolicy(nn.Module):
    """K - 1 stopping modules; the last stage always stops, so it needs none."""

    def __init__(self, num_stages: int, num_classes: int, hidden: int = 64):
        super().__init__()
        if num_stages < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got K={num_stages}")
        if hidden < 1:
            raise ValueError(f"policy_hidden must be >= 1, got {hidden}")
        self.num_stages, self.num_classes, self.hidden = num_stages, num_classes, hidden
        self.modules_per_stage = nn.ModuleList(
            StoppingModule(num_classes, hidden) for _ in range(num_stages - 1)
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Stop logits (batch, K - 1) from the softmaxes ``probs`` (batch, K, class)."""
        features = policy_features(probs)
        return torch.cat(
            [module(features[:, t]) for t, module in enumerate(self.modules_per_stage)], dim=1
        )

    def stop_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability of stopping at each stage (batch, K); the last column is 1."""
        stop = torch.sigmoid(self(probs))
        return torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1)

    def stop_at_stage(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Deterministic decisions at ``stage`` from its softmax (batch, C): stop if pi >= 1/2."""
        if stage >= self.num_stages - 1:
            return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        logits = self.modules_per_stage[stage](policy_features(probs)).squeeze(-1)
        return logits >= 0.0

    def policy_macs(self) -> list[int]:
        """Measured MACs of each stage's stopping module (0 for the last stage)."""
        sample = torch.full((1, self.num_classes), 1.0 / self.num_classes)
        sample = sample.to(next(self.parameters()).device)
        return [count_macs(m, sample) for m in self.modules_per_stage] + [0]


def stopping_module_macs(num_classes: int, hidden: int) -> int:
    """MACs of one stopping module of this width, measured."""
    return count_macs(StoppingModule(num_classes, hidden), torch.full((1, num_classes), 0.1))
