"""A saved stopping rule applied with numpy alone, for serving systems without torch.

Reads the JSON written by :func:`policycascade.rule_io.save_rule` and makes the same
decisions as the torch rule: stop at stage t where its score is >= 0, the last stage
always stops. This module imports only the standard library and numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "policycascade-rule"
VERSION = 1
FAMILIES = ("threshold", "shifted-threshold")
CRITERIA = ("max-softmax", "entropy", "softmax-margin", "logit-margin", "ensemble")
_EPS = 1e-12  # as in policycascade.agents.thresholds: log reads p < 1e-12 as 1e-12
PROB_ATOL = 1e-3  # as outputs_io.SIMPLEX_ATOL: a probability may exceed 1 by rounding this much
_CALIBRATION_NUMBERS = ("mean_cost", "accuracy")  # optional numbers of a calibration block


def encode_float(value: float) -> float | str:
    """A float JSON can hold: +-inf become the strings ``"inf"`` / ``"-inf"``."""
    value = float(value)
    if math.isnan(value):
        raise ValueError("a rule parameter is NaN: it cannot be saved")
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def decode_float(value: float | int | str, name: str) -> float:
    """The float :func:`encode_float` wrote."""
    if isinstance(value, str) and value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, 'inf' or '-inf', got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _running_ensemble(probs: np.ndarray) -> np.ndarray:
    """Mean of the softmaxes of stages 0..t for every t: (N, S, C) -> (N, S, C)."""
    visited = np.arange(1, probs.shape[1] + 1, dtype=probs.dtype)
    return probs.cumsum(1) / visited.reshape(1, -1, 1)


def _confidence(probs: np.ndarray, criterion: str) -> np.ndarray:
    """Confidence of each softmax (N, C) -> (N,), higher = surer."""
    eps = probs.dtype.type(_EPS)
    if criterion == "max-softmax":
        return probs.max(-1)
    if criterion == "entropy":
        return (probs * np.log(np.maximum(probs, eps))).sum(-1)  # minus the entropy
    top2 = -np.sort(-probs, axis=-1)[..., :2]
    if criterion == "softmax-margin":
        return top2[..., 0] - top2[..., 1]
    return np.log(np.maximum(top2[..., 0], eps)) - np.log(np.maximum(top2[..., 1], eps))


class ServingRule:
    """A threshold rule (optionally with per-stage offsets) read from a rule file.

    Stage t's score is ``confidence_t - thresholds[t]`` (minus ``offsets[t]`` for a
    shifted rule), in float64; the sample stops at the first stage whose score is >= 0.
    """

    def __init__(self, data: dict[str, Any], source: str = "<dict>"):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a {FORMAT} file (no 'format': {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(
                f"{source} has rule format version {data.get('version')!r}; "
                f"this code reads version {VERSION}"
            )
        family = data.get("family")
        if family not in FAMILIES:
            raise ValueError(f"{source}: family must be one of {list(FAMILIES)}, got {family!r}")
        self.source, self.data, self.family = source, data, family
        try:
            self._read_parameters(data)
        except KeyError as err:
            raise ValueError(f"{source} is not a complete rule file: no {err} entry") from None
        except TypeError as err:
            raise ValueError(f"{source} is not a well-formed rule file: {err}") from None

    def _read_parameters(self, data: dict[str, Any]) -> None:
        self.num_stages = int(data["num_stages"])
        self.num_classes = data.get("num_classes")
        self.stage_names = data.get("stage_names")
        params = data["parameters"]
        shifted = self.family == "shifted-threshold"
        base = params["base"]["parameters"] if shifted else params
        self.criterion = base["criterion"]
        if self.criterion not in CRITERIA:
            raise ValueError(f"{self.source}: criterion must be one of {list(CRITERIA)}")
        self.thresholds = self._stage_values(base["thresholds"], "thresholds")
        temps = base.get("temperatures")
        if temps is not None and len(temps) < self.num_stages - 1:
            raise ValueError(
                f"{self.source}: temperatures must hold one value per stage, got {temps}"
            )
        self.temperatures = None if temps is None else [float(t) for t in temps]
        self.offsets = self._stage_values(params["offsets"], "offsets") if shifted else None
        self._check_calibration(data.get("calibration"))

    def _check_calibration(self, block: Any) -> None:
        """The optional ``calibration`` block is what rule_io wrote, or a ValueError."""
        if block is None:
            return
        where = f"{self.source}: the 'calibration' block"
        if not isinstance(block, dict):
            raise ValueError(f"{where} must be a dict (or null), got {block!r}")
        missing = [key for key in ("num_samples", "exit_shares") if key not in block]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r} entry (found {sorted(block)})")
        count = block["num_samples"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: num_samples must be an integer >= 1, got {count!r}")
        shares = block["exit_shares"]
        if (
            not isinstance(shares, list)
            or len(shares) != self.num_stages
            or not all(_is_number(v) and 0 <= v <= 1 for v in shares)
        ):
            raise ValueError(
                f"{where}: exit_shares must be {self.num_stages} numbers in [0, 1] (one per "
                f"stage), got {shares!r}"
            )
        for key in _CALIBRATION_NUMBERS:
            if block.get(key) is not None and not _is_number(block[key]):
                raise ValueError(f"{where}: {key} must be a finite number, got {block[key]!r}")
        unit = block.get("cost_unit")
        if unit is not None and not isinstance(unit, str):
            raise ValueError(f"{where}: cost_unit must be a string, got {unit!r}")

    def _stage_values(self, values: list, name: str) -> np.ndarray:
        if len(values) != self.num_stages - 1:
            raise ValueError(
                f"{self.source}: {name} must hold {self.num_stages - 1} values, got {len(values)}"
            )
        return np.array([decode_float(v, name) for v in values], dtype=np.float64)

    def _cascade(self) -> str:
        names = f" {self.stage_names}" if self.stage_names else ""
        classes = f", {self.num_classes} classes" if self.num_classes is not None else ""
        return f"{self.num_stages} stages{names}{classes}"

    def check_outputs(self, probs: np.ndarray, visited: bool = False) -> np.ndarray:
        """``probs`` (N, K, C) as a float array, or a ValueError naming the rule's cascade.

        With ``visited=True`` fewer stages (N, S <= K, C) are accepted: early-exit serving.
        """
        probs = np.asarray(probs)
        if probs.dtype == object or not (
            np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)
        ):
            raise ValueError(f"probs must be a numeric array, got dtype {probs.dtype}")
        if not np.issubdtype(probs.dtype, np.floating):
            probs = probs.astype(np.float64)
        if probs.ndim != 3:
            raise ValueError(
                f"probs must be (sample, stage, class), got shape {probs.shape}; "
                f"the rule in {self.source} is for {self._cascade()}"
            )
        _, k, c = probs.shape
        wrong_k = not (1 <= k <= self.num_stages) if visited else k != self.num_stages
        if wrong_k or (self.num_classes is not None and c != self.num_classes):
            raise ValueError(
                f"probs has {k} stages and {c} classes but the rule in {self.source} is for "
                f"{self._cascade()}"
            )
        bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1 + PROB_ATOL)
        if bad.any():
            n, t, j = np.argwhere(bad)[0]
            raise ValueError(
                f"probs[{n}, {t}] (sample {n}, stage {t}) holds {probs[n, t, j]!r} at class {j}: "
                "probabilities must be finite and in [0, 1]"
            )
        return probs

    def stop_scores(self, probs: np.ndarray) -> np.ndarray:
        """Scores (N, min(S, K - 1)) in float64 from the visited softmaxes (N, S, C); >= 0 stops."""
        probs = self.check_outputs(probs, visited=True)
        columns = []
        for t in range(min(probs.shape[1], self.num_stages - 1)):
            if self.criterion == "ensemble":
                conf = _running_ensemble(probs[:, : t + 1])[:, -1].max(-1)
            else:
                stage = probs[:, t]
                if self.temperatures is not None:
                    eps = stage.dtype.type(_EPS)
                    scaled = np.log(np.maximum(stage, eps)) / stage.dtype.type(self.temperatures[t])
                    stage = _softmax(scaled)
                conf = _confidence(stage, self.criterion)
            score = conf.astype(np.float64) - self.thresholds[t]
            if self.offsets is not None:
                score = score - self.offsets[t]
            columns.append(score)
        if not columns:
            return np.zeros((len(probs), 0))
        return np.stack(columns, axis=1)

    def stop_at(self, stage: int, probs_so_far: np.ndarray) -> np.ndarray:
        """Whether each sample stops at ``stage``, given the softmaxes of stages 0..S-1 (N, S, C).

        Reads ``probs_so_far[:, : stage + 1]`` only; the last stage always stops.
        """
        if isinstance(stage, bool) or not isinstance(stage, int | np.integer):
            raise ValueError(f"stage must be an integer, got {stage!r}")
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        probs_so_far = self.check_outputs(probs_so_far, visited=True)
        if probs_so_far.shape[1] <= stage:
            raise ValueError(
                f"deciding at stage {stage} needs the softmaxes of stages 0..{stage}, "
                f"got {probs_so_far.shape[1]} stages in probs_so_far"
            )
        if stage == self.num_stages - 1:
            return np.ones(len(probs_so_far), dtype=bool)
        return self.stop_scores(probs_so_far[:, : stage + 1])[:, stage] >= 0

    def exit_stages(self, probs: np.ndarray) -> np.ndarray:
        """Exit stage (N,) int64 of each sample on every stage's softmaxes (N, K, C)."""
        probs = self.check_outputs(probs)
        stop = np.concatenate(
            [self.stop_scores(probs) >= 0, np.ones((len(probs), 1), dtype=bool)], axis=1
        )
        return stop.argmax(1).astype(np.int64)

    def predict(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exit stage, answered class), each (N,) int64.

        The answer is the exit classifier's arg-max, or the running ensemble's for the
        ensemble criterion.
        """
        probs = self.check_outputs(probs)
        exit_stage = self.exit_stages(probs)
        answers = _running_ensemble(probs) if self.criterion == "ensemble" else probs
        answer = answers[np.arange(len(probs)), exit_stage].argmax(-1)
        return exit_stage, answer.astype(np.int64)


def read_rule_file(path: str | Path) -> dict[str, Any]:
    """A rule file's JSON, checked by :class:`ServingRule` (the one format check)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rule file at {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not JSON: {err}") from None
    ServingRule(data, repr(str(path)))
    return data


def load_serving_rule(path: str | Path) -> ServingRule:
    """The rule saved at ``path`` by :func:`policycascade.rule_io.save_rule`."""
    return ServingRule(read_rule_file(path), repr(str(path)))


__all__ = ["FORMAT", "VERSION", "ServingRule", "decode_float", "encode_float", "load_serving_rule"]
