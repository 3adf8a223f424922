"""What a finished run stores beside its checkpoint, so that it can be read without training code.

``outputs.npz`` holds every classifier's softmax on the validation and test splits (the
layout of :mod:`policycascade.outputs_io`, with the run's stage costs and names);
``rule.pt`` the fitted stopping rule (a pickled torch object: load run directories you
trust only); ``rule.json`` the same rule for serving without torch, where its family has
a JSON form; ``run.json`` what a comparison needs to label the run. With these, loading,
comparing, certifying and early-exit evaluation on cached outputs need neither the data
set nor the classifiers' weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policycascade.agents.rules import StoppingRule
from policycascade.cascade import CascadeOutputs

OUTPUTS_NAME = "outputs.npz"
RULE_NAME = "rule.pt"
RULE_JSON_NAME = "rule.json"
SUMMARY_NAME = "run.json"
STORE_FORMAT = 1
STORED_SPLITS = ("val", "test")


@dataclass(frozen=True)
class RunSummary:
    """The labels a comparison needs: who trained the classifiers, on what, with which names."""

    label: str  # e.g. "continuation", "reinforce-frozen"
    trains_like_reference: bool
    dataset: str
    stage_names: list[str]
    # the algorithm's own metrics of its rule per split (REINFORCE: the expected reward)
    evaluation_extras: dict[str, dict[str, float]] = field(default_factory=dict)
    format: int = STORE_FORMAT


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file and rename it: a kill never leaves half a file."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def store_run(
    run_dir: Path,
    summary: RunSummary,
    outputs: dict[str, CascadeOutputs],
    rule: StoppingRule,
) -> None:
    """Write the run's outputs, rule and summary (each file replaced atomically)."""
    from policycascade.outputs_io import save_outputs
    from policycascade.rule_io import save_rule

    on_cpu = {split: out.to("cpu") for split, out in outputs.items()}
    _write_atomically(run_dir / OUTPUTS_NAME, lambda p: save_outputs(on_cpu, p))
    _write_atomically(run_dir / RULE_NAME, lambda p: torch.save(_on_cpu(rule), p))
    try:
        _write_atomically(
            run_dir / RULE_JSON_NAME, lambda p: save_rule(rule, p, outputs=on_cpu["val"])
        )
    except TypeError:  # a rule family without a JSON form (a neural stopping policy, say)
        pass
    _write_atomically(
        run_dir / SUMMARY_NAME,
        lambda p: p.write_text(json.dumps(summary.__dict__, indent=1), encoding="utf-8"),
    )


def _on_cpu(rule: StoppingRule) -> StoppingRule:
    """A torch-module rule moved to the CPU so that it loads on any machine."""
    if isinstance(rule, torch.nn.Module):
        import copy

        return copy.deepcopy(rule).to("cpu")
    return rule


def has_stored_outputs(run_dir: Path) -> bool:
    """Whether the run directory holds the stored outputs, rule and summary."""
    return all((run_dir / name).is_file() for name in (OUTPUTS_NAME, RULE_NAME, SUMMARY_NAME))


def read_summary(run_dir: Path) -> RunSummary:
    """The run's ``run.json``."""
    values: dict[str, Any] = json.loads((run_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    return RunSummary(**values)


def read_outputs(run_dir: Path) -> dict[str, CascadeOutputs]:
    """The run's stored outputs by split."""
    from policycascade.outputs_io import load_outputs

    return load_outputs(run_dir / OUTPUTS_NAME)


def read_rule(run_dir: Path) -> StoppingRule:
    """The run's fitted stopping rule (unpickled: a run directory you trust)."""
    return torch.load(run_dir / RULE_NAME, map_location="cpu", weights_only=False)
