"""A saved stopping rule applied with numpy alone, for serving systems without torch.

Reads the JSON written by :func:`policycascade.rule_io.save_rule` and makes the same
decisions as the torch rule: stop at stage t where its score is >= 0, the last stage
always stops. Families: confidence thresholds (optionally shifted per stage), class-aware
thresholds, the continuation-value rule (its small per-stage networks, stored as nested
lists) and the largest classifier alone. This module imports only the standard library
and numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "policycascade-rule"
VERSION = 1
FAMILIES = (
    "threshold",
    "shifted-threshold",
    "shifted",
    "class-aware-threshold",
    "continuation-value",
    "largest-only",
)
SHIFTABLE = ("threshold", "class-aware-threshold", "continuation-value")  # bases of "shifted"
CRITERIA = ("max-softmax", "entropy", "softmax-margin", "logit-margin", "ensemble")
FEATURE_SETS = ("max-softmax", "confidence", "history", "class")  # the continuation rule's
OUTCOMES = 4  # the continuation rule's joint outcome classes (agents/continuation.py)
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


def _tempered(stage: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of log(p) / T, as ``agents.thresholds.apply_temperature`` computes it."""
    eps = stage.dtype.type(_EPS)
    return _softmax(np.log(np.maximum(stage, eps)) / stage.dtype.type(temperature))


def _log_odds_of_top(probs: np.ndarray) -> np.ndarray:
    """Log-odds of the top class, 1 - p1 summed from the others (as stop_features)."""
    top = -np.sort(-probs, axis=-1)
    rest = top[..., 1:].sum(-1)
    return np.log(np.maximum(top[..., 0], _EPS)) - np.log(np.maximum(rest, _EPS))


def stop_features(history: np.ndarray, feature_set: str) -> np.ndarray:
    """Features (N, F) of the decision at stage S - 1, as ``agents.stop_features`` computes them."""
    current = history[:, -1]
    if feature_set == "max-softmax":
        return _log_odds_of_top(current)[:, None]
    top2 = -np.sort(-current, axis=-1)[:, :2]
    features = [
        np.stack(
            [
                _log_odds_of_top(current),
                top2[:, 0] - top2[:, 1],
                (current * np.log(np.maximum(current, _EPS))).sum(-1),
                np.log(np.maximum(top2[:, 0], _EPS)) - np.log(np.maximum(top2[:, 1], _EPS)),
            ],
            axis=1,
        )
    ]
    prediction = current.argmax(-1)
    if feature_set in ("history", "class"):
        earlier = history[:, :-1]
        ensemble = _running_ensemble(history)[:, -1]
        features += [
            _log_odds_of_top(earlier),
            (earlier.argmax(-1) == prediction[:, None]).astype(history.dtype),
            _log_odds_of_top(ensemble)[:, None],
            (ensemble.argmax(-1) == prediction)[:, None].astype(history.dtype),
        ]
    if feature_set == "class":
        features.append(np.eye(history.shape[-1], dtype=history.dtype)[prediction])
    return np.concatenate(features, axis=1)


class _Thresholds:
    """Family ``threshold``: stage t's score is its confidence minus ``thresholds[t]``."""

    def __init__(self, params: dict[str, Any], k: int, source: str):
        self.criterion = params["criterion"]
        if self.criterion not in CRITERIA:
            raise ValueError(f"{source}: criterion must be one of {list(CRITERIA)}")
        self.thresholds = _stage_values(params["thresholds"], "thresholds", k, source)
        self.temperatures = _temperatures(params.get("temperatures"), k, source)
        self.answer = "ensemble" if self.criterion == "ensemble" else "exit"

    def stop_scores(self, probs: np.ndarray, k: int) -> np.ndarray:
        columns = []
        for t in range(min(probs.shape[1], k - 1)):
            if self.criterion == "ensemble":
                conf = _running_ensemble(probs[:, : t + 1])[:, -1].max(-1)
            else:
                stage = probs[:, t]
                if self.temperatures is not None:
                    stage = _tempered(stage, self.temperatures[t])
                conf = _confidence(stage, self.criterion)
            columns.append(conf.astype(np.float64) - self.thresholds[t])
        return _columns(columns, len(probs))


class _ClassAware:
    """Family ``class-aware-threshold``: confidence minus the threshold of the arg-max class."""

    answer = "exit"

    def __init__(self, params: dict[str, Any], k: int, source: str):
        self.criterion = params["criterion"]
        if self.criterion not in CRITERIA[:-1]:
            raise ValueError(f"{source}: criterion must be one of {list(CRITERIA[:-1])}")
        rows = params["thresholds"]
        if not isinstance(rows, list) or len(rows) != k - 1:
            raise ValueError(f"{source}: thresholds must hold {k - 1} per-class lists")
        self.table = np.array(
            [[decode_float(v, "thresholds") for v in row] for row in rows], dtype=np.float64
        )
        if self.table.ndim != 2:
            raise ValueError(f"{source}: thresholds must hold one value per class at every stage")
        self.temperatures = _temperatures(params.get("temperatures"), k, source)
        offsets = params.get("offsets")
        self.offsets = None if offsets is None else _stage_values(offsets, "offsets", k, source)

    def stop_scores(self, probs: np.ndarray, k: int) -> np.ndarray:
        columns = []
        for t in range(min(probs.shape[1], k - 1)):
            stage = probs[:, t]
            predicted = stage.argmax(-1)
            if self.temperatures is not None:
                stage = _tempered(stage, self.temperatures[t])
            score = _confidence(stage, self.criterion).astype(np.float64) - self.table[t, predicted]
            if self.offsets is not None:  # inf - inf stops there, as in the torch rule
                with np.errstate(invalid="ignore"):
                    shifted = score - self.offsets[t]
                score = np.where(np.isnan(shifted), 0.0, shifted)
            columns.append(score)
        return _columns(columns, len(probs))


class _Continuation:
    """Family ``continuation-value``: each stage's small network, in float64 from the weights."""

    def __init__(self, params: dict[str, Any], k: int, source: str):
        config = params["config"]
        self.feature_set, self.answer = config["feature_set"], config["answer"]
        if self.feature_set not in FEATURE_SETS or self.answer not in ("exit", "ensemble"):
            raise ValueError(
                f"{source}: feature_set must be one of {list(FEATURE_SETS)} and answer 'exit' "
                f"or 'ensemble', got {self.feature_set!r}, {self.answer!r}"
            )
        if config["num_stages"] != k:
            raise ValueError(f"{source}: the continuation rule has {config['num_stages']} stages")
        self.alpha = float(config["alpha"])
        self.costs = np.array(config["cumulative_costs"], dtype=np.float64)
        models = params["stage_models"]
        if self.costs.shape != (k,) or len(models) != k - 1:
            raise ValueError(f"{source}: needs {k} cumulative costs and {k - 1} stage models")
        self.models = [_StageModel(m, OUTCOMES + k - 1 - t, source) for t, m in enumerate(models)]

    def stop_scores(self, probs: np.ndarray, k: int) -> np.ndarray:
        history = probs.astype(np.float32).astype(np.float64)  # what the torch rule reads
        columns = []
        for t in range(min(probs.shape[1], k - 1)):
            logits = self.models[t](stop_features(history[:, : t + 1], self.feature_set))
            outcome, exit_p = _softmax(logits[:, :OUTCOMES]), _softmax(logits[:, OUTCOMES:])
            extra = self.costs[t + 1 :] - self.costs[t]
            columns.append(outcome[:, 2] - outcome[:, 1] + self.alpha * (exit_p * extra).sum(-1))
        return _columns(columns, len(probs))


class _StageModel:
    """(features - mean) / scale, an optional ReLU layer, then the head: (N, F) -> logits."""

    def __init__(self, data: dict[str, Any], outputs: int, source: str):
        self.mean, self.scale = _array(data["mean"], source), _array(data["scale"], source)
        hidden = data.get("hidden")
        self.hidden = None if hidden is None else _layer(hidden, source)
        self.head = _layer(data["head"], source)
        width = len(self.mean) if self.hidden is None else len(self.hidden[1])
        if self.head[0].shape != (outputs, width) or (
            self.hidden is not None and self.hidden[0].shape[1] != len(self.mean)
        ):
            raise ValueError(f"{source}: a stage model's weights do not fit together")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        if features.shape[1] != len(self.mean):
            raise ValueError(
                f"a stage model reads {len(self.mean)} features, got {features.shape[1]}"
            )
        z = (features - self.mean) / self.scale
        if self.hidden is not None:
            z = np.maximum(z @ self.hidden[0].T + self.hidden[1], 0.0)
        return z @ self.head[0].T + self.head[1]


class _LargestOnly:
    """Family ``largest-only``: nothing stops before the last stage, which alone runs."""

    answer = "exit"

    def stop_scores(self, probs: np.ndarray, k: int) -> np.ndarray:
        return np.full((len(probs), min(probs.shape[1], k - 1)), -np.inf)


class _Shifted:
    """Families ``shifted`` and ``shifted-threshold``: a base family's score minus offsets."""

    def __init__(self, base, offsets: np.ndarray):
        self.base, self.offsets, self.answer = base, offsets, base.answer

    def stop_scores(self, probs: np.ndarray, k: int) -> np.ndarray:
        scores = self.base.stop_scores(probs, k)
        return scores - self.offsets[: scores.shape[1]]


def _scorer(family: str, params: dict[str, Any], k: int, source: str):
    """The numpy scorer of one family's parameters."""
    if family == "threshold":
        return _Thresholds(params, k, source)
    if family == "class-aware-threshold":
        return _ClassAware(params, k, source)
    if family == "continuation-value":
        return _Continuation(params, k, source)
    if family == "largest-only":
        return _LargestOnly()
    base = params["base"]
    base_family = base.get("family", "threshold")
    allowed = ("threshold",) if family == "shifted-threshold" else SHIFTABLE
    if base_family not in allowed:
        raise ValueError(
            f"{source}: a {family} rule's base family must be one of {list(allowed)}, "
            f"got {base_family!r}"
        )
    offsets = _stage_values(params["offsets"], "offsets", k, source)
    return _Shifted(_scorer(base_family, base["parameters"], k, source), offsets)


def _stage_values(values: list, name: str, k: int, source: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != k - 1:
        count = len(values) if isinstance(values, list) else values
        raise ValueError(f"{source}: {name} must hold {k - 1} values, got {count}")
    return np.array([decode_float(v, name) for v in values], dtype=np.float64)


def _temperatures(values: Any, k: int, source: str) -> list[float] | None:
    if values is None:
        return None
    if len(values) < k - 1:
        raise ValueError(f"{source}: temperatures must hold one value per stage, got {values}")
    return [float(t) for t in values]


def _array(data: dict[str, Any], source: str) -> np.ndarray:
    """A tensor stored as {"shape": [...], "values": nested lists}."""
    values = np.array(data["values"], dtype=np.float64)
    if list(values.shape) != list(data["shape"]) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"{source}: a weight of shape {data['shape']} holds values of shape "
            f"{list(values.shape)} (or non-finite values)"
        )
    return values


def _layer(data: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
    weight, bias = _array(data["weight"], source), _array(data["bias"], source)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"{source}: a layer needs a (out, in) weight and an (out,) bias")
    return weight, bias


def _columns(columns: list[np.ndarray], n: int) -> np.ndarray:
    return np.stack(columns, axis=1) if columns else np.zeros((n, 0))


class ServingRule:
    """A rule read from a rule file, applied with numpy: any family of :data:`FAMILIES`.

    Stage t's score is the family's (a confidence minus its threshold, a network's value
    of stopping minus continuing, ...), in float64; the sample stops at the first stage
    whose score is >= 0. ``skips_to_last``: the rule runs the last classifier alone (an
    early-exit server skips every other stage).
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
            self.num_stages = int(data["num_stages"])
            if self.num_stages < 2:
                raise ValueError(f"{source}: num_stages must be >= 2, got {self.num_stages}")
            self.num_classes = data.get("num_classes")
            self.stage_names = data.get("stage_names")
            self._scores = _scorer(family, data["parameters"], self.num_stages, source)
        except KeyError as err:
            raise ValueError(f"{source} is not a complete rule file: no {err} entry") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"{source} is not a well-formed rule file: {err}") from None
        self.skips_to_last = family == "largest-only"
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
        return self._scores.stop_scores(self.check_outputs(probs, visited=True), self.num_stages)

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

        The answer is the exit classifier's arg-max, or the running ensemble's for a rule
        that answers with it (the ensemble criterion, a continuation rule fitted so).
        """
        probs = self.check_outputs(probs)
        exit_stage = self.exit_stages(probs)
        answers = _running_ensemble(probs) if self._scores.answer == "ensemble" else probs
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
