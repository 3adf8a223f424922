"""Stopping policies and how they learn: rules, the continuation learner, REINFORCE, LtC.

Names are imported on first use, so that reading rules (``agents.thresholds``) does not
load the training stack.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "BASELINES": "baselines",
    "Baseline": "baselines",
    "make_baseline": "baselines",
    "ReinforceAgent": "reinforce",
    "ReinforceStep": "reinforce",
    "decision_log_prob": "reinforce",
    "exit_probabilities": "reinforce",
    "expected_return": "reinforce",
    "policy_gradient_variance": "reinforce",
    "sample_exits": "reinforce",
    "LearnedRule": "stopping_policy",
    "StoppingPolicy": "stopping_policy",
}


def __getattr__(name: str):
    """Import a public name's module on first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_PUBLIC)
