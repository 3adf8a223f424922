"""Early-exit inference: run a cascade stage by stage on the samples that have not stopped yet.

Training and evaluation run every classifier on every sample and decide exits
afterwards, on cached outputs. At inference time that would waste the savings
the cascade exists for, so here classifier t only ever sees the sub-batch of
samples that continued past stage t - 1.

:func:`export_bundle` writes a cascade and its stopping rule to one file of
``torch.export`` programs, and :func:`load_bundle` runs it again from that file
alone: no model classes, no training code (this module imports neither the run
harness nor the REINFORCE agent; only the package's own ``__init__`` still pulls in
the agents, for its gym registration).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from policycascade.checkpoint import save_atomic

if TYPE_CHECKING:
    from policycascade.agents.rules import StoppingRule
    from policycascade.cascade import Cascade
    from policycascade.costs import StageCosts

BUNDLE_FORMAT = "policycascade.early-exit-bundle"
BUNDLE_VERSION = 2  # 2: stop decisions read the visited stages' softmaxes (batch, t + 1, C)


@dataclass
class EarlyExitResult:
    """Per-sample outcome of early-exit inference, every tensor of shape (N,)."""

    predictions: torch.Tensor  # int64 arg-max class of the exit classifier
    exit_stage: torch.Tensor  # int64 stage each sample stopped at
    macs: torch.Tensor  # MACs spent up to the exit (int64; float64 for fractional costs)


# (stage, visited softmaxes (batch, stage + 1, C)) -> stop decisions (batch,) bool
StopAtStage = Callable[[int, torch.Tensor], torch.Tensor]
# (visited softmaxes padded to (batch, K, C), exit stage (batch,)) -> answers, or None: arg-max
Answer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]


def _run_stages(
    classifiers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    stop_at_stage: StopAtStage,
    cumulative_macs: Sequence[int],
    x: torch.Tensor,
    answer: Answer | None = None,
) -> EarlyExitResult:
    """The early-exit loop shared by a live cascade and a loaded bundle."""
    n, k = len(x), len(classifiers)
    device = x.device
    predictions = torch.zeros(n, dtype=torch.int64, device=device)
    exit_stage = torch.full((n,), k - 1, dtype=torch.int64, device=device)
    running = torch.arange(n, device=device)  # indices (into x) of the samples still running
    history: torch.Tensor | None = None  # (running, t + 1, C) softmaxes of the visited stages
    for t, classifier in enumerate(classifiers):
        probs = classifier(x).softmax(-1)  # (running, C)
        history = probs.unsqueeze(1) if history is None else torch.cat([history, probs[:, None]], 1)
        last = t == k - 1
        stop = torch.ones(len(x), dtype=torch.bool, device=device)
        if not last:
            stop = stop_at_stage(t, history).to(torch.bool)
        stopped = running[stop]
        answers = None
        if answer is not None and bool(stop.any()):
            visited = history[stop]
            padded = torch.cat(
                [visited, visited.new_zeros(len(visited), k - t - 1, visited.shape[-1])], 1
            )
            answers = answer(
                padded, torch.full((len(visited),), t, dtype=torch.int64, device=device)
            )
        predictions[stopped] = probs[stop].argmax(-1) if answers is None else answers
        exit_stage[stopped] = t
        running, x, history = running[~stop], x[~stop], history[~stop]
        if len(running) == 0:
            break
    costs = list(cumulative_macs)  # counted MACs (int), or measured costs that may be fractional
    dtype = torch.int64 if all(float(c).is_integer() for c in costs) else torch.float64
    macs = torch.tensor(costs, dtype=dtype, device=device)[exit_stage]
    return EarlyExitResult(predictions, exit_stage, macs)


def as_samples(x: Any, cascade: nn.Module, what: str = "x") -> torch.Tensor:
    """``x`` (a tensor, NumPy array or nested list of samples) as a tensor for ``cascade``.

    Floating-point samples take the dtype of the cascade's floating-point parameters
    (NumPy's float64 arrays, say); integer samples (token ids) and booleans stay as they are.
    """
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(
                f"{what} must be a tensor, a NumPy array of numbers or a list, got an object array"
            )
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        try:
            x = torch.tensor(x)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{what} must be a tensor, a NumPy array or a list of equally shaped samples: "
                f"{error}"
            ) from None
    elif not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{what} must be a torch tensor, a NumPy array or a list of samples, "
            f"got {type(x).__name__}"
        )
    if x.ndim == 0:
        raise ValueError(f"{what} must hold samples along its first dimension, got a scalar")
    if x.is_floating_point():
        dtype = next((p.dtype for p in cascade.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
    return x


def early_exit_predict(
    cascade: Cascade,
    rule: StoppingRule,
    x: torch.Tensor | np.ndarray | Sequence,
    costs: StageCosts | None = None,
) -> EarlyExitResult:
    """Predict with ``cascade`` under ``rule``, running each classifier only on unstopped samples.

    Gives the same exits, predictions and MACs as stepping ``CascadeStoppingEnv``
    with the rule's decisions, without paying for the stages a sample skips.
    ``x`` is a batch of samples as the classifiers take them: a tensor, a NumPy array or
    a list (see :func:`as_samples`). ``costs`` defaults to the cascade's classifiers plus
    ``rule.policy_macs()``. Runs in eval mode under ``torch.inference_mode()``; training
    flags are restored.
    """
    from policycascade.agents.rules import skips_to_last
    from policycascade.evaluation import exit_costs

    x = as_samples(x, cascade)
    if costs is None:
        costs = cascade.costs(rule.policy_macs())
    if costs.num_stages != cascade.num_stages:
        raise ValueError(
            f"costs describe {costs.num_stages} stages but the cascade has {cascade.num_stages}"
        )
    roots = [cascade] + ([rule] if isinstance(rule, nn.Module) else [])
    # Only touch modes when needed: a train()/eval() walk costs more than a small stage.
    was_training = [m for root in roots for m in root.modules() if m.training]
    device = next(cascade.parameters()).device
    try:
        if was_training:
            for root in roots:
                root.eval()
        with torch.inference_mode():
            if skips_to_last(rule):  # the certified fallback: only the last classifier runs
                cost = exit_costs(rule, costs)[-1]
                last = cascade.classifiers[-1]
                return _last_stage_only(last, cascade.num_stages, x.to(device), cost)
            return _run_stages(
                list(cascade.classifiers),
                lambda t, history: rule.stop_scores(history)[:, t] >= 0,
                costs.cumulative_macs,
                x.to(device),
                getattr(rule, "predictions", None),
            )
    finally:
        for m in was_training:
            m.training = True


def _last_stage_only(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    num_stages: int,
    x: torch.Tensor,
    cost: int | float,
) -> EarlyExitResult:
    """Every sample answered by the last ``classifier`` alone, at ``cost`` each."""
    n, last = len(x), num_stages - 1
    predictions = classifier(x).argmax(-1)
    exit_stage = torch.full((n,), last, dtype=torch.int64, device=x.device)
    dtype = torch.int64 if float(cost).is_integer() else torch.float64
    return EarlyExitResult(
        predictions, exit_stage, torch.full((n,), cost, dtype=dtype, device=x.device)
    )


class _StageDecision(nn.Module):
    """One stage of a stopping rule as a module, history (batch, t + 1, C) -> stop (batch,)."""

    def __init__(self, rule: StoppingRule, stage: int):
        super().__init__()
        self.rule, self.stage = rule, stage  # an nn.Module rule is registered, so its weights go

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.rule.stop_scores(history)[:, self.stage] >= 0


def _export_program(module: nn.Module, example: torch.Tensor, what: str) -> bytes:
    """``torch.export`` a (batch, ...) -> (batch, ...) module with a dynamic batch size."""
    try:
        program = torch.export.export(
            module, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
        )
    except Exception as error:
        raise ValueError(
            f"could not torch.export {what} ({type(error).__name__}: {error}); export_bundle "
            "needs classifiers and a stopping rule that torch.export can trace with a dynamic "
            "batch dimension"
        ) from error
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_bundle(
    path: str | Path, cascade: Cascade, rule: StoppingRule, meta: dict[str, Any] | None = None
) -> None:
    """Write ``cascade`` and ``rule`` to one file that :func:`load_bundle` runs without training.

    The file is ``torch.save`` of a plain dict (loadable with ``weights_only=True``):

    - ``classifiers``: K serialised ``torch.export`` programs, (batch, *input_shape)
      -> (batch, C) logits, exported on CPU in eval mode with a dynamic batch size;
    - ``stop_decisions``: K - 1 programs (none for the fallback below), the visited stages'
      softmaxes (batch, t + 1, C)
      -> stop (batch,) bool, traced from ``rule.stop_scores`` (a learned policy's weights,
      or a threshold rule's values, end up inside the program); the last stage always
      stops. A rule's own answers (an ensemble) are not exported: the bundle answers
      with the exit classifier's arg-max;
    - ``last_stage_only`` (and its ``last_stage_only_cost``): the rule is the certified
      fallback (:class:`~policycascade.agents.rules.LargestOnlyRule`), so the loaded
      bundle runs the last classifier alone;
    - ``stage_names``, ``input_shape``, ``num_classes``, the cost table (``costs``), the
      rule's class name, ``torch_version`` and the caller's ``meta`` (JSON-ready values).

    Written to a temporary file and renamed into place, so a crash leaves no partial file.
    """
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except TypeError as error:
        raise ValueError(f"meta must hold JSON-ready values only: {error}") from error
    from policycascade.agents.rules import skips_to_last
    from policycascade.costs import as_number
    from policycascade.evaluation import exit_costs

    costs = cascade.costs(rule.policy_macs())
    example = _example_batch(cascade)
    classifiers, decisions = [], []
    cpu_cascade = copy.deepcopy(cascade).cpu().eval()
    cpu_rule = copy.deepcopy(rule)
    if isinstance(cpu_rule, nn.Module):
        cpu_rule = cpu_rule.cpu().eval()
    with torch.no_grad():
        for name, clf in zip(cpu_cascade.names, cpu_cascade.classifiers, strict=True):
            classifiers.append(_export_program(clf, example, f"classifier {name!r}"))
        # the fallback decides nothing: its loaded bundle runs the last classifier alone
        for t in range(0 if skips_to_last(rule) else cascade.num_stages - 1):
            example_history = torch.randn(
                2, t + 1, cascade.num_classes, generator=torch.Generator().manual_seed(t)
            ).softmax(-1)
            decision = _StageDecision(cpu_rule, t).eval()
            decisions.append(_export_program(decision, example_history, f"stopping rule stage {t}"))
    bundle = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "classifiers": classifiers,
        "stop_decisions": decisions,
        "stage_names": list(cascade.names),
        "input_shape": list(cascade.input_shape),
        "input_dtype": str(example.dtype).removeprefix("torch."),
        "num_classes": cascade.num_classes,
        "costs": costs.as_dict(),
        "rule": type(rule).__name__,
        # the certified fallback: the last classifier alone, at its own cost
        "last_stage_only": bool(skips_to_last(rule)),
        "last_stage_only_cost": as_number(exit_costs(rule, costs)[-1]),  # plain, weights_only
        "torch_version": str(torch.__version__),
        "meta": meta,
    }
    save_atomic(bundle, path)


def _example_batch(cascade: Cascade) -> torch.Tensor:
    """Two samples to trace the classifiers with, drawn without touching torch's global RNG.

    A registered cascade's real sample (token ids, tables ...) where it has one, else
    standard-normal float inputs of the cascade's input shape.
    """
    sample = getattr(cascade, "cost_sample", None)
    if isinstance(sample, torch.Tensor):
        return sample.cpu().repeat(2, *([1] * (sample.ndim - 1)))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, *cascade.input_shape, generator=generator)


class BundlePredictor:
    """A cascade and stopping rule loaded from a bundle: ``predict(x)`` runs early exit on CPU."""

    def __init__(self, bundle: dict[str, Any]):
        if bundle.get("format") != BUNDLE_FORMAT or bundle.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"not a version-{BUNDLE_VERSION} early-exit bundle (format "
                f"{bundle.get('format')!r}, version {bundle.get('version')!r}); write it with "
                "policycascade.inference.export_bundle"
            )
        self.classifiers = [_load_program(b) for b in bundle["classifiers"]]
        self.stop_decisions = [_load_program(b) for b in bundle["stop_decisions"]]
        self.stage_names: list[str] = bundle["stage_names"]
        self.input_shape = tuple(bundle["input_shape"])
        self.input_dtype: str = bundle.get("input_dtype", "float32")  # older bundles: float32
        self.num_classes: int = bundle["num_classes"]
        self.costs: dict[str, list] = bundle["costs"]
        self.rule_name: str = bundle["rule"]
        self.last_stage_only = bool(bundle.get("last_stage_only", False))  # older: never
        self.last_stage_only_cost = bundle.get("last_stage_only_cost")
        self.meta: dict[str, Any] = bundle["meta"]

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.classifiers)

    def stop_at_stage(self, stage: int, history: torch.Tensor) -> torch.Tensor:
        """The exported rule's decisions (batch,) at ``stage`` from the visited softmaxes."""
        if stage >= self.num_stages - 1:
            return torch.ones(len(history), dtype=torch.bool, device=history.device)
        return self.stop_decisions[stage](history)

    def predict(self, x: torch.Tensor | np.ndarray | Sequence) -> EarlyExitResult:
        """Early-exit predictions, exit stages and MACs for a batch ``x`` (N, *input_shape)."""
        x = as_samples(x, nn.Module())
        dtype = getattr(torch, self.input_dtype, None)
        if x.is_floating_point() and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            x = x.to(dtype)  # the dtype the programs were exported with
        with torch.inference_mode():
            if self.last_stage_only:
                cost = self.last_stage_only_cost
                return _last_stage_only(self.classifiers[-1], self.num_stages, x.cpu(), cost)
            return _run_stages(
                self.classifiers, self.stop_at_stage, self.costs["cumulative_macs"], x.cpu()
            )

    __call__ = predict


def _load_program(data: bytes) -> nn.Module:
    return torch.export.load(io.BytesIO(data)).module()


def load_bundle(path: str | Path) -> BundlePredictor:
    """Load a file written by :func:`export_bundle` (plain data only: ``weights_only=True``)."""
    return BundlePredictor(torch.load(path, map_location="cpu", weights_only=True))


__all__ = [
    "BundlePredictor",
    "as_samples",
    "EarlyExitResult",
    "early_exit_predict",
    "export_bundle",
    "load_bundle",
]
