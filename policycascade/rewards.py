"""The stopping MDP's reward: -loss - alpha * (cost of every stage run).

Guan et al. eq. (1). The environments and the REINFORCE agents both compute
rewards here, so the MDP the agent optimises is the one users step through.
"""

from __future__ import annotations

import torch

LOSSES = ("zero-one", "cross-entropy")
_MIN_PROB = 1e-12


def check_loss_name(loss: str) -> str:
    """Return ``loss`` if it names a supported prediction loss, else raise naming the options."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    return loss


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it is finite and >= 0, else raise naming the value."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}") from None
    if not (alpha >= 0.0 and alpha < float("inf")):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha


def prediction_loss(
    exit_probs: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, loss: str
) -> torch.Tensor:
    """Loss of each prediction, shape (batch,).

    ``zero-one`` is 1 for a wrong prediction and 0 for a right one;
    ``cross-entropy`` is -log of the probability the exit classifier gave the
    true label (differentiable in ``exit_probs``; ``predictions`` unused).
    """
    if loss == "zero-one":
        return (predictions != labels).to(exit_probs.dtype)
    if loss == "cross-entropy":
        label_prob = exit_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return -label_prob.clamp_min(_MIN_PROB).log()
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")


def step_reward(
    alpha: float, stage_cost: torch.Tensor, terminal_loss: torch.Tensor, done: torch.Tensor
) -> torch.Tensor:
    """Reward of one step at stage t: ``-alpha * cost_t``, and ``-loss`` too if the episode ends."""
    return -alpha * stage_cost - torch.where(done, terminal_loss, torch.zeros_like(terminal_loss))


def episode_return(alpha: float, cumulative_cost: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of an episode that exits after spending ``cumulative_cost``.

    Equals the sum of the per-step rewards of :func:`step_reward` along the episode.
    """
    return -loss - alpha * cumulative_cost
