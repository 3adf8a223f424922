"""The interface every stopping policy satisfies, learned or rule-based."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StoppingRule(Protocol):
    """Anything that decides, stage by stage, from that stage's softmax whether to stop.

    ``stop_at_stage(stage, probs)`` takes the softmax of classifier ``stage``
    for a batch, shape (batch, C), and returns booleans (batch,): True = stop.
    At the last stage every sample stops. ``policy_macs()`` is the rule's own
    cost per stage (K values, 0 for the last stage).
    """

    num_stages: int

    def stop_at_stage(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Stop decisions (batch,) at ``stage``."""
        ...

    def policy_macs(self) -> list[int]:
        """MACs of the rule itself at each stage."""
        ...


def stop_decisions(rule: StoppingRule, probs: torch.Tensor) -> torch.Tensor:
    """Every stage's decision on cached softmaxes (batch, K, C) -> (batch, K) booleans."""
    k = probs.shape[1]
    return torch.stack([rule.stop_at_stage(t, probs[:, t]) for t in range(k)], dim=1)
