"""policycascade: learned stopping policies over model cascades.

Importing the package registers the built-in gym id (``policycascade/DigitsCascade-v0``)
and nothing else: every public name below is imported on first use, so that
``import policycascade.serving`` (applying a saved rule with numpy) never loads torch.
"""

from __future__ import annotations

import importlib

from policycascade.builtin_ids import register_builtin

register_builtin()

# public name -> module that defines it (the curated API the README's journeys use)
_PUBLIC = {
    # outputs: the seam every policy is judged on
    "CascadeOutputs": "policycascade.cascade",
    "outputs_from_arrays": "policycascade.outputs_io",
    "load_outputs": "policycascade.outputs_io",
    "save_outputs": "policycascade.outputs_io",
    # rules: fit, evaluate, save, apply
    "StoppingRule": "policycascade.agents.rules",
    "fit_rule": "policycascade.fitting",
    "evaluate": "policycascade.fitting",
    "save_rule": "policycascade.rule_io",
    "load_rule": "policycascade.rule_io",
    "certified_fit": "policycascade.certify",
    "DriftWatch": "policycascade.watch",
    "RuleWatch": "policycascade.watch_combined",
    # cascades of torch modules: register, train, load, compare, predict
    "Cascade": "policycascade.cascade",
    "StageCosts": "policycascade.costs",
    "count_macs": "policycascade.costs",
    "register_cascade": "policycascade.envs.registration",
    "train_policy": "policycascade.runs",
    "load_run": "policycascade.runs",
    "LoadedRun": "policycascade.runs",
    "compare_runs": "policycascade.compare.api",
    "compare_outputs": "policycascade.compare.policies",
    "early_exit_predict": "policycascade.inference",
}


def __getattr__(name: str):
    """Import a public name's module on first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'policycascade' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"
