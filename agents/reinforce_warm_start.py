"""Warm start of REINFORCE's stopping modules: fit a rule on held-out outputs, then imitate it.

At a small alpha a stop decision's stake (alpha times the cost saved) is tiny next to the
0/1 loss, so the score-function estimator's noise swamps it and the modules drift to
*always continue*. Instead they can start where a rule fitted on the pre-trained
classifiers' held-out outputs is: the rule's stop/continue decision at every stage is the
target of a binary cross-entropy, and the joint phase only has to improve from there.

The rule reads what a stopping module reads (stage t's softmax alone): the continuation-value
rule on the ``confidence`` features (:mod:`policycascade.agents.continuation`, fitted on the
given outputs, no cross-fitting) or the best-reward confidence thresholds
(:func:`policycascade.agents.thresholds.best_reward_rule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from policycascade.agents.continuation import fit_continuation_rule
from policycascade.agents.rules import StoppingRule
from policycascade.agents.stopping_policy import StoppingPolicy
from policycascade.agents.thresholds import best_reward_rule
from policycascade.cascade import CascadeOutputs
from policycascade.config_schema import WARM_STARTS
from policycascade.evaluation import evaluate_rule

RULE_FEATURES = "confidence"  # stage t's softmax alone: what a stopping module reads
IMITATION_LR = 1e-2  # Adam; 200 passes reach ~97-99% agreement on digits' 270 val outputs

__all__ = [
    "IMITATION_LR",
    "RULE_FEATURES",
    "WARM_STARTS",
    "fit_warm_start_rule",
    "imitate",
    "stop_agreement",
    "stop_targets",
    "warm_start_policy",
]


def fit_warm_start_rule(
    outputs: CascadeOutputs, alpha: float, kind: str, seed: int = 0
) -> StoppingRule:
    """The rule the stopping modules imitate, fitted on held-out ``outputs`` at ``alpha``.

    ``kind``: ``"rule"`` (continuation-value rule) or ``"thresholds"`` (best-reward
    confidence thresholds). Costs are ``outputs.costs``, normalised by the largest classifier.
    """
    if kind == "rule":
        costs = outputs.costs
        cumulative = [m / costs.reference_macs for m in costs.cumulative_macs]
        return fit_continuation_rule(
            outputs.probs, outputs.labels, cumulative, alpha, RULE_FEATURES, seed=seed
        )
    if kind == "thresholds":
        return best_reward_rule(outputs.probs, outputs.labels, outputs.costs, alpha)
    raise ValueError(f"warm_start must be one of {list(WARM_STARTS[1:])} here, got {kind!r}")


def stop_targets(rule: StoppingRule, probs: torch.Tensor) -> torch.Tensor:
    """The rule's decision at every stage but the last, (N, K - 1) floats: 1 = stop."""
    return (rule.stop_scores(probs) >= 0).float()


def stop_agreement(policy: StoppingPolicy, probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of (sample, stage) decisions where the policy (stop iff pi >= 1/2) agrees."""
    with torch.no_grad():
        decisions = (policy(probs) >= 0).float()
    return float((decisions == targets.to(decisions.device)).float().mean())


def imitate(
    policy: StoppingPolicy,
    probs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    lr: float = IMITATION_LR,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> float:
    """Train ``policy`` in place to reproduce ``targets`` (N, K - 1) on softmaxes (N, K, C).

    Binary cross-entropy of each stop logit against the rule's decision, every stage and
    sample weighted alike, ``epochs`` shuffled passes with a fresh Adam (the caller's
    optimiser is untouched). Shuffled with ``generator`` only, so the global random
    state is not used. Returns the mean loss of the last pass.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if targets.shape != (probs.shape[0], probs.shape[1] - 1):
        raise ValueError(
            f"targets must be (sample, K - 1) = {(probs.shape[0], probs.shape[1] - 1)}, "
            f"got {tuple(targets.shape)}"
        )
    probs, targets = probs.detach(), targets.to(probs.device, probs.dtype)
    optimiser = torch.optim.Adam(policy.parameters(), lr=lr)
    n, total = len(probs), 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(probs.device)
        total = torch.zeros((), dtype=torch.float64, device=probs.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(policy(probs[idx]), targets[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.detach().double() * len(idx)
    return float(total) / n


def warm_start_policy(
    policy: StoppingPolicy,
    outputs: CascadeOutputs,
    alpha: float,
    kind: str,
    epochs: int,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the ``kind`` rule on held-out ``outputs`` and make ``policy`` imitate it, in place.

    Returns what to log (``warm_start/...``): the rule's accuracy and MAC share on these
    outputs, the imitation's last loss, and the policy's agreement with the rule's
    decisions before and after.
    """
    probs = outputs.probs.detach()
    rule = fit_warm_start_rule(outputs, alpha, kind, seed)
    targets = stop_targets(rule, probs).to(probs.device)
    before = stop_agreement(policy, probs, targets)
    loss = imitate(policy, probs, targets, epochs, batch_size=batch_size, generator=generator)
    rule_metrics = evaluate_rule(rule, outputs)
    return {
        "warm_start/rule_accuracy": float(rule_metrics["accuracy"]),
        "warm_start/rule_macs_share": float(rule_metrics["macs_share"]),
        "warm_start/rule_stop_share": float(targets.mean()),
        "warm_start/imitation_loss": loss,
        "warm_start/agreement_before": before,
        "warm_start/agreement": stop_agreement(policy, probs, targets),
    }
