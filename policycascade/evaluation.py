"""One evaluation for every policy: exits and predictions on cached cascade outputs -> metrics."""

from __future__ import annotations

from typing import Any

import torch

from policycascade.agents.rules import (
    StoppingRule,
    exit_stages,
    first_stop,
    rule_predictions,
    skips_to_last,
)
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts


def exit_costs(rule: StoppingRule, costs: StageCosts) -> list[int | float]:
    """Cost of a sample exiting at each stage under ``rule``, in the costs' unit.

    Every stage up to the exit ran, the rule's stopping modules included; a rule that
    skips to the last stage (:class:`~policycascade.agents.rules.LargestOnlyRule`) pays the
    last classifier alone there (its other entries are never reached).
    """
    paid = costs.with_policy_macs(rule.policy_macs())
    out = list(paid.cumulative_macs)
    if skips_to_last(rule):
        out[-1] = paid.alone_macs[-1]
    return out


def evaluate_exits(
    outputs: CascadeOutputs,
    exit_stage: torch.Tensor,
    predictions: torch.Tensor | None = None,
    costs_by_exit: list[int | float] | None = None,
) -> dict[str, Any]:
    """Accuracy, cost and exit statistics of a policy that exits at ``exit_stage``.

    ``predictions`` defaults to the exit classifier's arg-max; ``costs_by_exit`` (K
    values, default the cumulative costs) what a sample exiting at each stage spent
    (:func:`exit_costs`). Returns plain
    Python numbers and lists (JSON-ready):

    - ``accuracy``; ``mean_macs`` (per sample, every stage run up to the exit,
      stopping modules included) and ``macs_share`` (of the most expensive classifier);
    - ``exit_distribution``: share of samples that exit at each stage;
    - ``stage_accuracy``: accuracy of each single classifier on all samples;
    - ``accuracy_by_exit``: (exit stage, classifier) accuracy of each classifier on
      the samples that exit at each stage (Guan et al. Figure 4); NaN for empty rows.
    """
    probs, labels, costs = outputs.probs, outputs.labels, outputs.costs
    n, k, _ = probs.shape
    exit_stage = exit_stage.to(probs.device)
    if predictions is None:
        predictions = probs[torch.arange(n, device=probs.device), exit_stage].argmax(-1)
    if costs_by_exit is None:
        costs_by_exit = costs.cumulative_macs
    elif len(costs_by_exit) != k:
        raise ValueError(f"costs_by_exit needs {k} values, got {len(costs_by_exit)}")
    by_exit_cost = torch.tensor(costs_by_exit, dtype=torch.float64, device=probs.device)
    spent = by_exit_cost[exit_stage]
    counts = torch.bincount(exit_stage, minlength=k).to(torch.float64)
    stage_correct = (probs.argmax(-1) == labels.unsqueeze(1)).to(torch.float64)  # (n, k)
    one_hot_exit = torch.nn.functional.one_hot(exit_stage, k).to(torch.float64)  # (n, k)
    by_exit = (one_hot_exit.T @ stage_correct) / counts.unsqueeze(1)
    mean_macs = float(spent.mean())
    return {
        "accuracy": float((predictions == labels).to(torch.float64).mean()),
        "mean_macs": mean_macs,
        "macs_share": mean_macs / costs.reference_macs,
        "exit_distribution": (counts / n).tolist(),
        "stage_accuracy": stage_correct.mean(0).tolist(),
        "accuracy_by_exit": by_exit.tolist(),
        "num_samples": n,
    }


def evaluate_rule(
    rule: StoppingRule, outputs: CascadeOutputs, stop_scores: torch.Tensor | None = None
) -> dict[str, Any]:
    """Any stopping rule on cached outputs: its exits and answers, scored by :func:`evaluate_exits`.

    The outputs' stage costs are replaced by the rule's own (its ``policy_macs``), so every
    rule pays for exactly what it runs (:func:`exit_costs`: the last classifier alone for
    a rule that skips to it). ``stop_scores``: the rule's scores on these outputs where
    the caller has them already (else computed).
    """
    if not isinstance(outputs, CascadeOutputs):
        raise TypeError(f"outputs must be CascadeOutputs, got {type(outputs).__name__}")
    if not (
        callable(getattr(rule, "stop_scores", None))
        and callable(getattr(rule, "policy_macs", None))
    ):
        raise TypeError(f"rule must be a stopping rule (stop_scores, policy_macs), got {rule!r}")
    stages = getattr(rule, "num_stages", outputs.num_stages)
    if stages != outputs.num_stages:
        raise ValueError(f"rule has {stages} stages but the outputs have {outputs.num_stages}")
    costs = outputs.costs.with_policy_macs(rule.policy_macs())
    if stop_scores is None:
        exit_stage = exit_stages(rule, outputs.probs)
    else:
        stop_scores = _checked_scores(stop_scores, outputs)
        last = torch.ones_like(stop_scores[:, :1], dtype=torch.bool)
        exit_stage = first_stop(torch.cat([stop_scores >= 0, last], dim=1))
    predictions = rule_predictions(rule, outputs.probs, exit_stage)
    return evaluate_exits(
        outputs.with_costs(costs), exit_stage, predictions, exit_costs(rule, outputs.costs)
    )


def _checked_scores(stop_scores: object, outputs: CascadeOutputs) -> torch.Tensor:
    """``stop_scores`` as real scores (sample, K - 1) on the outputs' device, or a clear error.

    Booleans are refused: stop decisions passed as scores would all read as >= 0 (stop).
    """
    expected = (outputs.num_samples, outputs.num_stages - 1)
    if not isinstance(stop_scores, torch.Tensor):
        shape = getattr(stop_scores, "shape", None)
        got = type(stop_scores).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")
        raise ValueError(f"stop_scores must be a tensor of shape {expected}, got {got}")
    if tuple(stop_scores.shape) != expected:
        raise ValueError(
            f"stop_scores must be a tensor of shape {expected}, got {tuple(stop_scores.shape)}"
        )
    if stop_scores.dtype == torch.bool or stop_scores.is_complex():
        raise ValueError(f"stop_scores must hold real scores (>= 0 stops), got {stop_scores.dtype}")
    if stop_scores.is_meta:
        raise ValueError("stop_scores must hold values, got a tensor on the meta device")
    return stop_scores.detach().to(outputs.probs.device)


__all__ = ["evaluate_exits", "evaluate_rule", "exit_costs", "first_stop"]
