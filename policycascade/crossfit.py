"""Cross-fitted classifier outputs and per-classifier early-stopped reference training.

A stopping policy fitted on the classifiers' outputs on their own training
samples learns from predictions that are right and near-certain on every
sample (in-sample outputs). Cross-fitting gives every training sample the
outputs of classifiers that never saw it: the samples are split into stratified
folds, and fold f is scored by classifiers fitted on the other folds only.

The reference a learned cascade should be compared with is
:func:`train_reference`: the same classifiers trained independently, each kept
at its own best validation epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from policycascade.cascade import Cascade
from policycascade.costs import eval_mode
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.seeding import seeded
from policycascade.supervised import (
    ClassifierFitting,
    TrainingOptions,
    fit_classifiers,
    resolve_options,
    trained_classes_of,
)

# fit(x_train, y_train, fold_seed) -> predict(x) giving (n, K, C) logits
Predictor = Callable[[torch.Tensor], torch.Tensor]
Fitter = Callable[[torch.Tensor, torch.Tensor, int], Predictor]
# on_epoch(epoch, val_accuracy): epoch counts from 1, one validation accuracy per classifier
EpochCallback = Callable[[int, list[float]], None]


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Held-out indices of ``folds`` stratified folds shuffled by ``seed``: a partition."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    labels_np = labels.cpu().numpy()
    smallest = int(np.bincount(labels_np).min(initial=len(labels_np)))
    if smallest < folds:
        raise ValueError(
            f"folds={folds} needs at least {folds} samples of every class; the rarest present "
            f"class has {smallest}: use fewer folds"
        )
    from sklearn.model_selection import StratifiedKFold  # slow import: only when folding

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [
        torch.from_numpy(np.sort(held)).to(torch.int64)
        for _, held in splitter.split(np.zeros(len(labels_np)), labels_np)
    ]


def fold_seed(seed: int, fold: int, folds: int) -> int:
    """The seed handed to ``fit`` for one fold: distinct for every (seed, fold) pair."""
    return seed * folds + fold


def cross_fitted_outputs(
    fit: Fitter, x: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0
) -> torch.Tensor:
    """Softmaxes (N, K, C) where each sample's row comes from classifiers fitted without it.

    ``fit(x_train, y_train, fold_seed)`` trains on the other folds and returns a
    function mapping inputs to (n, K, C) logits; it is called once per fold with
    ``fold_seed = seed * folds + fold``. Folds are stratified by ``y`` and drawn from ``seed``;
    the result is on the CPU.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    probs: torch.Tensor | None = None
    for fold, held in enumerate(stratified_folds(y, folds, seed)):
        kept = torch.ones(len(y), dtype=torch.bool)
        kept[held] = False
        predict = fit(x[kept], y[kept], fold_seed(seed, fold, folds))
        with torch.no_grad():
            fold_probs = predict(x[held]).float().softmax(-1).cpu()  # (held, K, C)
        if probs is None:
            probs = torch.empty(len(y), *fold_probs.shape[1:])
        probs[held] = fold_probs
    assert probs is not None  # folds >= 2, so the loop ran
    return probs


def cascade_fitter(
    cascade_name: str,
    input_shape: Sequence[int],
    num_classes: int,
    epochs: int = 40,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    device: str | torch.device = "cpu",
    *,
    options: TrainingOptions | None = None,
) -> Fitter:
    """A ``fit`` for :func:`cross_fitted_outputs`: a fresh cascade trained like pre-training.

    Each call runs with torch's global generator seeded by its ``fold_seed`` (the
    classifiers' initial weights; the caller's generator is restored after) and trains
    with :func:`~policycascade.supervised.fit_classifiers` (cross-entropy on every stage,
    specialists masked) with ``options``; ``lr``, ``batch_size`` and ``weight_decay`` are
    the older way to set three of them. The predictions run at the options' precision.
    """
    options = resolve_options(options, lr, batch_size, weight_decay)

    def fit(x_train: torch.Tensor, y_train: torch.Tensor, seed: int) -> Predictor:
        with seeded(seed):
            cascade = build_cascade(cascade_name, input_shape, num_classes).to(device)
            fit_classifiers(cascade, Split(x_train, y_train), epochs, seed=seed, options=options)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with options.autocast(torch.device(device)):
                return logits_of(cascade, x)

        return predict

    return fit


@torch.no_grad()
def logits_of(cascade: Cascade, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Every classifier's logits (n, K, C) in eval mode, computed on the cascade's device."""
    device = next(cascade.parameters()).device
    with eval_mode(cascade):
        return torch.cat(
            [cascade(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        )


def stage_accuracy(cascade: Cascade, split: Split) -> list[float]:
    """Accuracy of each classifier on ``split``, a specialist's on its trained classes only."""
    predictions = logits_of(cascade, split.x).argmax(-1).cpu()  # (n, K)
    correct = (predictions == split.y.cpu().unsqueeze(1)).double()
    accuracy = []
    for t, classes in enumerate(trained_classes_of(cascade)):
        keep = torch.ones(len(split.y), dtype=torch.bool)
        if classes is not None:
            keep = torch.isin(split.y.cpu(), torch.tensor(sorted(classes)))
        accuracy.append(float(correct[keep, t].mean()) if keep.any() else float("nan"))
    return accuracy


class ReferenceTraining:
    """:func:`train_reference` one epoch at a time, with a state to checkpoint and resume.

    After every :meth:`step` each classifier's validation accuracy is measured and its
    weights, buffers included, are kept if they beat its best so far (the earliest epoch
    wins ties); at ``bf16`` precision the validation pass is autocast too, as the run
    evaluates its classifiers. :meth:`state_dict` holds everything the remaining epochs
    depend on (the cascade's weights, the optimiser, its lr schedule, the shuffle and
    augmentation generators, the best weights so far), so
    a training stopped between epochs and restored continues bit for bit; torch's global
    generator (dropout) is the caller's to save.
    """

    def __init__(
        self,
        cascade: Cascade,
        train: Split,
        val: Split,
        epochs: int = 40,
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        seed: int = 0,
        *,
        options: TrainingOptions | None = None,
    ):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.cascade, self.val, self.epochs = cascade, val, epochs
        self.epoch = 0  # epochs finished
        self.best_accuracy = [float("-inf")] * cascade.num_stages
        self.best_state: list[dict[str, torch.Tensor]] = [{} for _ in range(cascade.num_stages)]
        self._fitting = ClassifierFitting(
            cascade, train, lr, batch_size, weight_decay, seed, options=options
        )

    @property
    def done(self) -> bool:
        """Whether every epoch has been trained."""
        return self.epoch >= self.epochs

    def step(self) -> list[float]:
        """Train one epoch, keep each classifier's best weights; returns the val accuracies."""
        self._fitting.run_epoch()
        self.epoch += 1
        with self._fitting.options.autocast(self._fitting.device):  # as the run evaluates it
            accuracy = stage_accuracy(self.cascade, self.val)
        for t, acc in enumerate(accuracy):
            if not self.best_state[t] or acc > self.best_accuracy[t]:  # NaN (no val) keeps epoch 1
                self.best_accuracy[t] = acc
                self.best_state[t] = copy.deepcopy(self.cascade.classifiers[t].state_dict())
        return accuracy

    def finish(self) -> Cascade:
        """The cascade, in eval mode, holding every classifier's kept weights."""
        for clf, state in zip(self.cascade.classifiers, self.best_state, strict=True):
            clf.load_state_dict(state)
        return self.cascade.eval()

    def state_dict(self) -> dict[str, Any]:
        """Everything the remaining epochs depend on."""
        return {
            "epoch": self.epoch,
            "cascade": self.cascade.state_dict(),
            "fitting": self._fitting.state_dict(),
            "best_accuracy": list(self.best_accuracy),
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.cascade.load_state_dict(state["cascade"])
        self._fitting.load_state_dict(state["fitting"])
        self.epoch = int(state["epoch"])
        self.best_accuracy = list(state["best_accuracy"])
        self.best_state = state["best_state"]


def train_reference(
    cascade: Cascade,
    train: Split,
    val: Split,
    epochs: int = 40,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
    *,
    options: TrainingOptions | None = None,
) -> Cascade:
    """Train every classifier on cross-entropy; keep each one's weights from its best val epoch.

    The honest alternative to a learned cascade: independent classifiers with
    per-classifier early stopping. Training is
    :func:`~policycascade.supervised.fit_classifiers` with ``options`` (the stage losses
    share no parameters, so one optimiser over their sum equals K independent ones); see
    :class:`ReferenceTraining`. ``on_epoch(epoch, val_accuracy)`` is told each epoch's
    accuracies. Returns the cascade, in eval mode, holding every classifier's kept weights.
    """
    training = ReferenceTraining(
        cascade, train, val, epochs, lr, batch_size, weight_decay, seed, options=options
    )
    while not training.done:
        accuracy = training.step()
        if on_epoch is not None:
            on_epoch(training.epoch, accuracy)
    return training.finish()
