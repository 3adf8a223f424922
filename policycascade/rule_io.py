"""A fitted stopping rule as a JSON file: saved from torch, read back by torch or by numpy.

The file names the cascade the rule was fitted for (stage names, classes, costs), so a
rule applied to another cascade's outputs is refused, and, when calibration outputs
are given, what the rule did on them (exit shares, mean cost, accuracy) for a drift
monitor. :mod:`policycascade.serving` applies the file with numpy alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from policycascade.agents.rules import LargestOnlyRule, StoppingRule
from policycascade.agents.thresholds import ShiftedRule, ThresholdRule
from policycascade.cascade import CascadeOutputs
from policycascade.evaluation import evaluate_rule
from policycascade.outputs_io import refuse_existing, write_atomically
from policycascade.serving import (
    FORMAT,
    VERSION,
    decode_float,
    encode_float,
    read_rule_file,
)

# float32 scores computed by torch and by numpy differ by a few rounding errors (log, exp and
# sums are not bitwise the same); 1e-5 * max(1, |t|) is ~100 float32 ulps of the scale
ROUNDING_SLACK = 1e-5
_RESERVED = (
    "format",
    "version",
    "family",
    "parameters",
    "num_stages",
    "num_classes",
    "stage_names",
    "costs",
    "calibration",
)


def rule_to_dict(rule: StoppingRule, outputs: CascadeOutputs | None = None) -> dict[str, Any]:
    """JSON-ready description of ``rule``; with calibration ``outputs``, also its cascade.

    Given ``outputs``, a finite threshold (offset) t that some calibration score
    reaches by less than ``ROUNDING_SLACK * max(1, |t|)`` is lowered by that margin, but
    never past the middle of the gap to the next lower calibration score: no calibration
    decision changes, and a sample sitting on the threshold still stops when numpy
    computes its score a few float32 rounding errors lower than torch did. The fitted
    values are kept under ``fitted_thresholds`` (``fitted_offsets``).
    """
    family, params = _parameters(rule)
    data: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "family": family,
        "parameters": params,
        "num_stages": rule.num_stages,
        "num_classes": None,
        "stage_names": None,
        "costs": None,
    }
    if outputs is None:
        return data
    if outputs.num_stages != rule.num_stages:
        raise ValueError(
            f"outputs have {outputs.num_stages} stages but the rule has {rule.num_stages}"
        )
    _lower_by_rounding_margin(data, rule, outputs.probs)
    costs = outputs.costs
    data["num_classes"] = outputs.num_classes
    data["stage_names"] = outputs.names or [f"stage{t}" for t in range(outputs.num_stages)]
    data["costs"] = {
        "unit": costs.unit,
        "classifier": costs.classifier_macs,
        "alone": costs.alone_macs,
        "policy": list(rule.policy_macs()),
    }
    metrics = evaluate_rule(rule_from_dict(data), outputs)
    data["calibration"] = {
        "num_samples": metrics["num_samples"],
        "exit_shares": metrics["exit_distribution"],
        "mean_cost": metrics["mean_macs"],
        "cost_unit": costs.unit,
        "accuracy": metrics["accuracy"],
    }
    return data


def save_rule(
    rule: StoppingRule,
    path: str | Path,
    outputs: CascadeOutputs | None = None,
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``rule`` (see :func:`rule_to_dict`) and ``extra`` blocks to ``path``; return the dict.

    ``extra`` adds top-level blocks (a ``guarantee``, say); it cannot replace the rule's own.
    An existing ``path`` is replaced only with ``overwrite=True``; the file is written whole
    (through a temporary file in the same folder) or not at all.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or a path, got {type(path).__name__} {path!r}")
    path = Path(path)
    refuse_existing(path, overwrite)
    data = rule_to_dict(rule, outputs)
    for key, value in (extra or {}).items():
        if key in _RESERVED:
            raise ValueError(f"extra must not replace the rule's own block {key!r}")
        data[key] = value
    text = json.dumps(data, indent=2, allow_nan=False)
    write_atomically(path, lambda tmp: tmp.write_text(text + "\n"))
    return data


def load_rule(path: str | Path, outputs: CascadeOutputs | None = None) -> StoppingRule:
    """The torch rule saved at ``path``; with ``outputs``, first check it is their cascade's."""
    path = Path(path)
    data = read_rule_file(path)  # the format checks, shared with serving
    if outputs is not None:
        check_rule_outputs(data, outputs, repr(str(path)))
    return rule_from_dict(data)


def rule_from_dict(data: dict[str, Any]) -> StoppingRule:
    """The torch rule :func:`rule_to_dict` described."""
    return _rule(data["family"], data["parameters"], int(data["num_stages"]))


def _rule(family: str, params: dict[str, Any], num_stages: int) -> StoppingRule:
    if family == "threshold":
        return _threshold_rule(params)
    if family == "largest-only":
        return LargestOnlyRule(num_stages, params.get("name", "largest classifier alone"))
    if family == "class-aware-threshold":
        from policycascade.agents.class_aware import ClassAwareThresholdRule

        offsets = params.get("offsets")
        return ClassAwareThresholdRule(
            params["criterion"],
            [[decode_float(v, "thresholds") for v in row] for row in params["thresholds"]],
            params.get("temperatures"),
            params.get("name", ""),
            shared_thresholds=params.get("shared_thresholds"),
            alpha=params.get("alpha"),
            offsets=None if offsets is None else [decode_float(v, "offsets") for v in offsets],
        )
    if family == "continuation-value":
        from policycascade.agents.continuation import ContinuationValueRule

        return ContinuationValueRule.from_json_parameters(params)
    if family in ("shifted-threshold", "shifted"):
        base = params["base"]
        offsets = [decode_float(v, "offsets") for v in params["offsets"]]
        inner = _rule(base.get("family", "threshold"), base["parameters"], num_stages)
        return ShiftedRule(inner, offsets, params["name"])
    raise ValueError(f"unknown rule family {family!r}")


def check_rule_outputs(data: dict[str, Any], outputs: CascadeOutputs, source: str = "rule") -> None:
    """One-line ValueError when ``outputs`` are not from the cascade the rule was fitted for."""
    names = outputs.names or [f"stage{t}" for t in range(outputs.num_stages)]
    theirs = (outputs.num_stages, outputs.num_classes, names, outputs.costs.classifier_macs)
    costs = data.get("costs") or {}
    ours = (
        data["num_stages"],
        data.get("num_classes"),
        data.get("stage_names"),
        costs.get("classifier"),
    )
    same = all(o is None or o == t for o, t in zip(ours, theirs, strict=True))
    if not same:
        raise ValueError(
            f"the rule in {source} was fitted for stages {ours[2]} ({ours[0]} stages, "
            f"{ours[1]} classes, classifier costs {ours[3]}); these outputs have stages "
            f"{names} ({theirs[0]} stages, {theirs[1]} classes, classifier costs {theirs[3]})"
        )


def _parameters(rule: StoppingRule) -> tuple[str, dict[str, Any]]:
    """(family, JSON-ready parameters) of a rule the file format knows."""
    if isinstance(rule, ShiftedRule):
        if isinstance(rule.base, ShiftedRule):
            raise TypeError(
                "a ShiftedRule can be saved only over a ThresholdRule, ClassAwareThresholdRule or "
                "ContinuationValueRule, got a ShiftedRule over ShiftedRule"
            )
        family, params = _parameters(rule.base)
        if family == "largest-only":
            raise TypeError("a ShiftedRule over a LargestOnlyRule cannot be saved: shift nothing")
        return "shifted-threshold" if family == "threshold" else "shifted", {
            "base": {"family": family, "parameters": params},
            "offsets": [encode_float(v) for v in rule.offsets],
            "name": rule.name,
        }
    if isinstance(rule, ThresholdRule):
        return "threshold", _threshold_parameters(rule)
    if isinstance(rule, LargestOnlyRule):
        return "largest-only", {"name": rule.name}
    kind = type(rule).__name__
    if kind == "ClassAwareThresholdRule":  # by name: core does not import the class to check
        return "class-aware-threshold", _class_aware_parameters(rule)
    if kind == "ContinuationValueRule":
        return "continuation-value", rule.to_json_parameters()
    raise TypeError(
        f"save_rule supports ThresholdRule, ClassAwareThresholdRule, ContinuationValueRule, "
        f"LargestOnlyRule and a ShiftedRule over one of the first three, got {kind}"
    )


def _class_aware_parameters(rule) -> dict[str, Any]:
    def floats(values):
        return None if values is None else [encode_float(v) for v in values]

    return {
        "criterion": rule.criterion,
        "thresholds": [[encode_float(v) for v in row] for row in rule.thresholds],
        "temperatures": None
        if rule.temperatures is None
        else [float(t) for t in rule.temperatures],
        "offsets": floats(rule.offsets),
        "shared_thresholds": floats(rule.shared_thresholds),
        "alpha": rule.alpha,
        "name": rule.name,
    }


def _threshold_parameters(rule: ThresholdRule) -> dict[str, Any]:
    return {
        "criterion": rule.criterion,
        "thresholds": [encode_float(v) for v in rule.thresholds],
        "temperatures": None
        if rule.temperatures is None
        else [float(t) for t in rule.temperatures],
        "name": rule.name,
    }


def _threshold_rule(params: dict[str, Any]) -> ThresholdRule:
    return ThresholdRule(
        params["criterion"],
        [decode_float(v, "thresholds") for v in params["thresholds"]],
        params.get("temperatures"),
        params.get("name", ""),
    )


def _lower_by_rounding_margin(
    data: dict[str, Any], rule: StoppingRule, probs: torch.Tensor
) -> None:
    """Lower each finite cut by a rounding margin within its calibration gap (rule_to_dict).

    Cuts: a threshold rule's thresholds, a shifted rule's offsets, a class-aware rule's
    per-class thresholds (its offsets where it has them). A continuation rule's own cut
    (0) stays: its scores differ by float32 rounding between torch and numpy.
    """
    params, family = data["parameters"], data["family"]
    if family == "threshold":
        scores = rule.confidences(probs).double().cpu()  # stop iff confidence >= threshold
        _lower_cuts(params, "thresholds", [(scores[:, t], t) for t in range(scores.shape[1])])
    elif family in ("shifted-threshold", "shifted"):
        scores = rule.base.stop_scores(probs).double().cpu()  # stop iff base score >= offset
        _lower_cuts(params, "offsets", [(scores[:, t], t) for t in range(scores.shape[1])])
    elif family == "class-aware-threshold" and rule.offsets is not None:
        scores = dataclasses.replace(rule, offsets=None).stop_scores(probs).cpu()
        _lower_cuts(params, "offsets", [(scores[:, t], t) for t in range(scores.shape[1])])
    elif family == "class-aware-threshold":
        conf, predicted = rule.confidences(probs)
        conf, predicted = conf.double().cpu(), predicted.cpu()
        cells = [
            (conf[predicted[:, t] == c, t], (t, c))
            for t in range(conf.shape[1])
            for c in range(rule.num_classes)
        ]
        _lower_cuts(params, "thresholds", cells)


def _lower_cuts(params: dict[str, Any], key: str, cells: list) -> None:
    """Lower ``params[key]`` (flat, or rows by (t, c)) at each (scores, index) of ``cells``."""
    fitted = json.loads(json.dumps(params[key]))  # a copy, nested or flat
    lowered = json.loads(json.dumps(params[key]))
    for scores, index in cells:
        if isinstance(index, tuple):
            t, c = index
            cut = decode_float(fitted[t][c], key)
            lowered[t][c] = encode_float(_lowered(scores, cut))
        else:
            cut = decode_float(fitted[index], key)
            lowered[index] = encode_float(_lowered(scores, cut))
    if lowered != fitted:
        params[f"fitted_{key}"] = fitted
        params[key] = lowered


def _lowered(scores: torch.Tensor, cut: float) -> float:
    """``cut`` lowered by the rounding margin, staying above the middle of the gap below it."""
    if not math.isfinite(cut):
        return cut
    slack = ROUNDING_SLACK * max(1.0, abs(cut))
    if not bool(((scores >= cut) & (scores < cut + slack)).any()):
        return cut  # no calibration sample stops by less than a rounding margin
    lowered = cut - slack
    below = scores[scores < cut]
    if len(below):
        lower = float(below.max())
        lowered = max(lowered, lower + (cut - lower) / 2)
        if not lower < lowered:
            return cut  # two scores one rounding error apart: nothing to gain
    return lowered if lowered < cut else cut


__all__ = ["check_rule_outputs", "load_rule", "rule_from_dict", "rule_to_dict", "save_rule"]
