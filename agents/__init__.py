"""Stopping policies and how they learn: the REINFORCE agent and its baselines."""

from policycascade.agents.baselines import BASELINES, Baseline, make_baseline
from policycascade.agents.reinforce import (
    ReinforceAgent,
    ReinforceStep,
    decision_log_prob,
    exit_probabilities,
    expected_return,
    policy_gradient_variance,
    sample_exits,
)
from policycascade.agents.stopping_policy import LearnedRule, StoppingPolicy

__all__ = [
    "BASELINES",
    "Baseline",
    "ReinforceAgent",
    "ReinforceStep",
    "LearnedRule",
    "StoppingPolicy",
    "decision_log_prob",
    "exit_probabilities",
    "expected_return",
    "make_baseline",
    "policy_gradient_variance",
    "sample_exits",
]
