"""Classifiers trained for the cascade: each stage's loss weighted by its role in the cascade.

Every method starts like the reference (:func:`~policycascade.crossfit.train_reference`:
the classifiers trained alone, each kept from its best validation epoch) for all but
``cascade_epochs`` of the epoch budget, then spends those epochs, in ``rounds`` rounds,
retraining every stage with per-sample weights on its cross-entropy
(:class:`~policycascade.supervised.ClassifierFitting` with ``sample_weights``, warm
start, the same training options). The weightings (``weighting``):

* ``"exit"``: fit a max-softmax threshold rule on validation (half a point below the
  last stage), run it on the training split and weigh sample i at stage t by
  ``floor + (1 - floor) * ((1 - reach_share) * [i exits at t] + reach_share * [i reaches t])``.
* ``"defer"`` (learning-to-defer style, "confidence where it matters"): weight
  ``1 + defer_weight`` where stage t is right and stage t + 1 wrong, 1 elsewhere.
* ``"cascade-aware"`` (after Wang et al. 2024, CAT): weight ``deferred_weight`` where
  stage t is wrong and a later stage right (the cascade defers those anyway), 1 elsewhere.
* ``"plain"``: weight 1 everywhere: the control that spends the same epochs the same way
  without weights.

Weights are recomputed at the start of each round from the current classifiers, on the
training split and, the same way, on validation. Within a round each stage keeps its
weights from the epoch (the round's start included) with the best weighted validation
accuracy, as the reference keeps each classifier's best validation epoch (``keep="best"``),
or the last epoch's weights stay (``keep="last"``: the weighting's own effect).
:func:`validation_key` scores a whole cascade instead (the fewest validation MACs at an
accuracy); selecting snapshots by it over-fitted the 270 digits validation samples in a
first trial, so it is not used for selection. Nothing reads the test split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import ThresholdSearch
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.crossfit import logits_of, train_reference
from policycascade.data import Split
from policycascade.supervised import (
    ClassifierFitting,
    TrainingOptions,
    resolve_options,
    trained_classes_of,
)

WEIGHTINGS = ("plain", "exit", "defer", "cascade-aware")
KEEPS = ("best", "last")
HALF_POINT = 0.005
# The cascade phase's shuffle seed is the run's seed plus this (a stream no config seed shares).
CASCADE_STREAM = 2**33


@dataclass(frozen=True)
class CascadeTraining:
    """How the last ``cascade_epochs`` of the budget retrain the stages for the cascade."""

    weighting: str = "exit"  # one of WEIGHTINGS
    cascade_epochs: int = 10  # epochs of weighted retraining (the rest train alone)
    rounds: int = 2  # weights recomputed this many times (epochs split evenly)
    floor: float = 0.2  # exit: the weight of a sample stage t neither answers nor sees
    reach_share: float = 0.5  # exit: share of (1 - floor) for reaching t (rest: answered)
    accuracy_drop: float = HALF_POINT  # exit: the rule's validation drop below the last stage
    defer_weight: float = 2.0  # defer: extra weight where t is right and t + 1 wrong
    deferred_weight: float = 0.0  # cascade-aware: weight where t is wrong, a later stage right
    keep: str = "best"  # "best": each stage's best weighted-validation epoch; "last": the last

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {list(KEEPS)}, got {self.keep!r}")
        for name in ("cascade_epochs", "rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.rounds > self.cascade_epochs:
            raise ValueError(
                f"rounds ({self.rounds}) must not exceed cascade_epochs ({self.cascade_epochs})"
            )
        for name in ("floor", "reach_share", "accuracy_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("defer_weight", "deferred_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def round_epochs(self) -> list[int]:
        """Epochs of each round: ``cascade_epochs`` split as evenly as possible, longer first."""
        base, extra = divmod(self.cascade_epochs, self.rounds)
        return [base + (1 if r < extra else 0) for r in range(self.rounds)]


def exit_weights(exits: torch.Tensor, k: int, floor: float, reach_share: float) -> torch.Tensor:
    """(N, K) weights ``floor + (1 - floor) ((1 - s) [exit = t] + s [exit >= t])``.

    ``s`` is ``reach_share``; ``exits`` (N,) holds each sample's exit stage.
    """
    stages = torch.arange(k, device=exits.device)
    answered = (exits.unsqueeze(1) == stages).float()
    reached = (exits.unsqueeze(1) >= stages).float()
    return floor + (1.0 - floor) * ((1.0 - reach_share) * answered + reach_share * reached)


def defer_weights(correct: torch.Tensor, defer_weight: float) -> torch.Tensor:
    """(N, K) weights: ``1 + defer_weight`` where stage t is right and t + 1 wrong (t < K - 1)."""
    correct = correct.bool()
    weights = torch.ones(correct.shape, device=correct.device)
    weights[:, :-1] += defer_weight * (correct[:, :-1] & ~correct[:, 1:]).float()
    return weights


def cascade_aware_weights(correct: torch.Tensor, deferred_weight: float) -> torch.Tensor:
    """(N, K) weights: ``deferred_weight`` where stage t is wrong and a later stage right."""
    correct = correct.bool()
    # later_right[:, t]: some stage after t is right (False for the last stage)
    later = correct.flip(1).cummax(1).values.flip(1)  # some stage >= t right
    later_right = torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1)
    deferred = ~correct & later_right
    return torch.where(deferred, torch.tensor(float(deferred_weight)), torch.tensor(1.0))


def stage_weights(
    config: CascadeTraining,
    probs: torch.Tensor,
    labels: torch.Tensor,
    rule: Any | None = None,
) -> torch.Tensor | None:
    """The (N, K) loss weights ``config.weighting`` gives samples with softmaxes ``probs``.

    ``rule`` (a stopping rule fitted on validation) is needed by the exit weighting only;
    ``"plain"`` gives None (the unweighted loss).
    """
    k = probs.shape[1]
    if config.weighting == "plain":
        return None
    if config.weighting == "exit":
        if rule is None:
            raise ValueError("the exit weighting needs the validation-fitted rule, got rule=None")
        return exit_weights(exit_stages(rule, probs), k, config.floor, config.reach_share)
    correct = probs.argmax(-1) == labels.unsqueeze(1)
    if config.weighting == "defer":
        return defer_weights(correct, config.defer_weight)
    return cascade_aware_weights(correct, config.deferred_weight)


def split_outputs(cascade: Cascade, split: Split) -> CascadeOutputs:
    """Every stage's softmax on ``split`` (eval mode, on the CPU), with measured free-rule costs."""
    probs = logits_of(cascade, split.x).float().softmax(-1).cpu()
    return CascadeOutputs(probs, split.y.cpu(), cascade.costs())


def validation_key(val: CascadeOutputs, target: float) -> tuple[float, float, float]:
    """How good a cascade is on validation, larger is better: (reaches target, -MACs, accuracy).

    The max-softmax rule fitted on ``val`` with the fewest mean MACs at accuracy
    ``target`` (the most accurate one where none reaches it).
    """
    search = ThresholdSearch(val.probs, val.labels, val.costs, "max-softmax")
    rule = search.for_accuracy(target)
    thresholds = torch.tensor([rule.thresholds], dtype=torch.float64)
    accuracy, macs = (float(v[0]) for v in search.evaluate_many(thresholds))
    feasible = accuracy >= target - 1e-12
    return (float(feasible), -macs if feasible else -float("inf"), accuracy)


def weighted_stage_accuracy(
    outputs: CascadeOutputs,
    weights: torch.Tensor | None,
    trained_classes: list[frozenset[int] | None],
) -> list[float]:
    """Each stage's validation accuracy under ``weights`` (N, K), specialists on their classes.

    None weighs every sample 1 (then it is the reference's per-stage accuracy).
    """
    correct = (outputs.probs.argmax(-1) == outputs.labels.unsqueeze(1)).double()
    w = torch.ones_like(correct) if weights is None else weights.double().cpu()
    accuracy = []
    for t, classes in enumerate(trained_classes):
        wt = w[:, t]
        if classes is not None:
            wt = wt * torch.isin(outputs.labels, torch.tensor(sorted(classes))).double()
        total = float(wt.sum())
        accuracy.append(float((wt * correct[:, t]).sum()) / total if total > 0 else float("nan"))
    return accuracy


@dataclass
class CascadeTrained:
    """The trained cascade (eval mode) and what each cascade-phase epoch scored on validation."""

    cascade: Cascade
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)  # per stage (0: as trained alone)


def _set_round_weights(
    config: CascadeTraining,
    cascade: Cascade,
    train: Split,
    val: Split,
    fitting: ClassifierFitting,
) -> tuple[CascadeOutputs, torch.Tensor | None]:
    """Weigh ``fitting``'s samples for a round; return validation's outputs and weights."""
    val_outputs = split_outputs(cascade, val)
    rule = None
    if config.weighting == "exit":
        search = ThresholdSearch(
            val_outputs.probs, val_outputs.labels, val_outputs.costs, "max-softmax"
        )
        rule = search.for_accuracy_drop(config.accuracy_drop)
    train_outputs = split_outputs(cascade, train)
    fitting.set_sample_weights(
        stage_weights(config, train_outputs.probs, train_outputs.labels, rule)
    )
    val_weights = stage_weights(config, val_outputs.probs, val_outputs.labels, rule)
    return val_outputs, val_weights


def train_for_cascade(
    cascade: Cascade,
    train: Split,
    val: Split,
    epochs: int,
    config: CascadeTraining | None = None,
    seed: int = 0,
    *,
    options: TrainingOptions | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> CascadeTrained:
    """Train ``cascade`` for ``epochs`` in all: alone, then ``config.cascade_epochs`` for it.

    The first ``epochs - cascade_epochs`` epochs are :func:`train_reference`'s with the
    same seed and options (so they replay the reference's first epochs exactly); the rest
    are weighted by ``config.weighting`` (module docstring). With ``keep="best"``, within
    each round every stage keeps its weights from the epoch (the round's start included)
    with the best weighted validation accuracy, the validation samples weighted as the
    training ones (for ``"plain"``: the reference's own per-stage early stopping); with
    ``keep="last"`` the last epoch's weights stay. ``train`` and ``val`` hold
    model inputs. ``on_epoch`` is told each cascade-phase epoch's validation record.
    """
    config = config or CascadeTraining()
    options = resolve_options(options)
    alone = epochs - config.cascade_epochs
    if alone < 1:
        raise ValueError(
            f"epochs ({epochs}) must exceed cascade_epochs ({config.cascade_epochs}): the "
            "classifiers first train alone for at least one epoch"
        )
    train_reference(cascade, train, val, alone, seed=seed, options=options)
    classes = trained_classes_of(cascade)
    k = cascade.num_stages
    result = CascadeTrained(cascade, best_epoch=[0] * k)
    fitting = ClassifierFitting(cascade, train, seed=seed + CASCADE_STREAM, options=options)
    epoch = 0
    for round_index, round_epochs in enumerate(config.round_epochs(), start=1):
        val_outputs, val_weights = _set_round_weights(config, cascade, train, val, fitting)
        best = weighted_stage_accuracy(val_outputs, val_weights, classes)
        best_state = [copy.deepcopy(clf.state_dict()) for clf in cascade.classifiers]
        result.history.append({"epoch": epoch, "round": round_index, "val_score": list(best)})
        for _ in range(round_epochs):
            fitting.run_epoch()
            epoch += 1
            score = weighted_stage_accuracy(split_outputs(cascade, val), val_weights, classes)
            record = {"epoch": epoch, "round": round_index, "val_score": score}
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            for t, value in enumerate(score):
                if value > best[t] or config.keep == "last":  # the earliest epoch wins ties
                    best[t], result.best_epoch[t] = value, epoch
                    best_state[t] = copy.deepcopy(cascade.classifiers[t].state_dict())
        for clf, state in zip(cascade.classifiers, best_state, strict=True):
            clf.load_state_dict(state)
    result.cascade = cascade.eval()
    return result
