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

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from policycascade.cascade import Cascade
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.supervised import fit_classifiers, trained_classes_of

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
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    device: str | torch.device = "cpu",
) -> Fitter:
    """A ``fit`` for :func:`cross_fitted_outputs`: a fresh cascade trained like pre-training.

    Each call seeds torch's global generator with its ``fold_seed`` (the
    classifiers' initial weights) and trains with :func:`~policycascade.supervised.fit_classifiers`
    (Adam, cross-entropy on every stage, specialists masked).
    """

    def fit(x_train: torch.Tensor, y_train: torch.Tensor, seed: int) -> Predictor:
        torch.manual_seed(seed)
        cascade = build_cascade(cascade_name, input_shape, num_classes).to(device)
        fit_classifiers(
            cascade, Split(x_train, y_train), epochs, lr, batch_size, weight_decay, seed
        )
        return lambda x: logits_of(cascade, x)

    return fit


@torch.no_grad()
def logits_of(cascade: Cascade, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Every classifier's logits (n, K, C) in eval mode, computed on the cascade's device."""
    device = next(cascade.parameters()).device
    was_training = cascade.training
    cascade.eval()
    try:
        return torch.cat(
            [cascade(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        )
    finally:
        cascade.train(was_training)


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


def train_reference(
    cascade: Cascade,
    train: Split,
    val: Split,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
) -> Cascade:
    """Train every classifier on cross-entropy; keep each one's weights from its best val epoch.

    The honest alternative to a learned cascade: independent classifiers with
    per-classifier early stopping. Training is
    :func:`~policycascade.supervised.fit_classifiers` (the stage losses share no
    parameters, so one Adam over their sum equals K independent ones). After every
    epoch each classifier's validation accuracy (:func:`stage_accuracy`) is measured
    and its weights, buffers included, are kept if they beat its best so far: the
    earliest epoch wins ties.
    ``on_epoch(epoch, val_accuracy)`` is told each epoch's accuracies. Returns
    the cascade, in eval mode, holding every classifier's kept weights.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    best_accuracy = [float("-inf")] * cascade.num_stages
    best_state: list[dict[str, torch.Tensor]] = [{} for _ in range(cascade.num_stages)]

    def keep_best(epoch: int) -> None:
        accuracy = stage_accuracy(cascade, val)
        for t, acc in enumerate(accuracy):
            if not best_state[t] or acc > best_accuracy[t]:  # a NaN (no val samples) keeps epoch 1
                best_accuracy[t] = acc
                best_state[t] = copy.deepcopy(cascade.classifiers[t].state_dict())
        if on_epoch is not None:
            on_epoch(epoch, accuracy)

    fit_classifiers(cascade, train, epochs, lr, batch_size, weight_decay, seed, keep_best)
    for clf, state in zip(cascade.classifiers, best_state, strict=True):
        clf.load_state_dict(state)
    return cascade.eval()
