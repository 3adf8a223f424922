"""The interface every stopping policy satisfies, learned or rule-based; its one decision path.

Also the one rule that skips stages, :class:`LargestOnlyRule` (the largest classifier alone).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StoppingRule(Protocol):
    """Anything that scores, stage by stage, whether to stop on the softmaxes seen so far.

    ``stop_scores(history)`` takes the softmaxes of the first S visited stages,
    shape (batch, S, C), and returns (batch, min(S, K - 1)) scores: stop at stage t
    where the score is >= 0. Stage t's score reads ``history[:, : t + 1]`` only, so
    the same call serves cached outputs (S = K) and early-exit inference (S = t + 1).
    The last stage always stops. ``policy_macs()`` is the rule's own cost per stage
    (K values, 0 for the last stage).
    """

    num_stages: int

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """Stop scores (batch, min(S, K - 1)) from the visited stages' softmaxes (batch, S, C)."""
        ...

    def policy_macs(self) -> list[int]:
        """MACs of the rule itself at each stage."""
        ...


def stop_decisions(rule: StoppingRule, probs: torch.Tensor) -> torch.Tensor:
    """Every stage's decision on cached softmaxes (batch, K, C) -> (batch, K) booleans.

    The last column is True: the last stage always stops.
    """
    scores = rule.stop_scores(probs)
    last = torch.ones_like(scores[:, :1], dtype=torch.bool)
    return torch.cat([scores >= 0, last], dim=1)


def exit_stages(rule: StoppingRule, probs: torch.Tensor) -> torch.Tensor:
    """Exit stage of each sample under ``rule``: its first *stop*, shape (batch,)."""
    return first_stop(stop_decisions(rule, probs))


def first_stop(stop: torch.Tensor) -> torch.Tensor:
    """Exit stage of each sample: the first stage whose decision is *stop*.

    ``stop`` is (sample, K) booleans, one decision per stage; the last stage
    always stops, whatever its column says.
    """
    stop = stop.clone()
    stop[:, -1] = True
    return stop.to(torch.uint8).argmax(dim=1)


def rule_predictions(
    rule: StoppingRule, probs: torch.Tensor, exit_stage: torch.Tensor
) -> torch.Tensor | None:
    """The class a rule answers with at its exits, or None for the exit classifier's arg-max.

    A rule may answer otherwise (with the ensemble of the visited stages, say) by
    defining ``predictions(probs, exit_stage)``.
    """
    predict = getattr(rule, "predictions", None)
    return None if predict is None else predict(probs, exit_stage)


class LargestOnlyRule:
    """Send every sample straight to the last classifier: only it runs, and it answers.

    The certified fallback (``policycascade.certify``): it decides as a rule that never
    stops before the last stage (scores -inf), but it *skips* the earlier stages, so it
    costs the last classifier alone (``StageCosts.alone_macs[-1]``), not every stage's
    cumulative cost. Code that charges or runs stages asks :func:`skips_to_last`.
    """

    skips_to_last = True

    def __init__(self, num_stages: int, name: str = "largest classifier alone"):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 2:
            raise ValueError(f"num_stages must be an integer >= 2, got {num_stages!r}")
        self.num_stages, self.name = num_stages, name

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """-inf at every stage but the last (float64): nothing stops before it."""
        columns = min(history.shape[1], self.num_stages - 1)
        return torch.full(
            (len(history), columns), -torch.inf, dtype=torch.float64, device=history.device
        )

    def policy_macs(self) -> list[int]:
        """It decides nothing at run time: no stopping module runs."""
        return [0] * self.num_stages

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LargestOnlyRule) and (other.num_stages, other.name) == (
            self.num_stages,
            self.name,
        )

    def __hash__(self) -> int:
        return hash((LargestOnlyRule, self.num_stages, self.name))

    def __repr__(self) -> str:
        return f"LargestOnlyRule(num_stages={self.num_stages})"


def skips_to_last(rule: StoppingRule) -> bool:
    """Whether ``rule`` runs only the last classifier (skips every earlier stage)."""
    return getattr(rule, "skips_to_last", False) is True
