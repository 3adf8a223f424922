"""Cross-entropy training of every classifier of a cascade: pre-training and the supervised term."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from policycascade.cascade import Cascade
from policycascade.data import Split
from policycascade.optimizers import build_optimizer


def cross_entropy_all_stages(
    logits: torch.Tensor,
    labels: torch.Tensor,
    trained_classes: Sequence[Collection[int] | None] | None = None,
) -> torch.Tensor:
    """Sum over stages of each classifier's mean cross-entropy; ``logits`` is (batch, K, C).

    ``trained_classes[t]`` (a classifier's ``trained_classes`` attribute, e.g. a
    specialist's) restricts stage t's mean to the samples whose label is one of
    those classes: the others are masked out of that stage's loss, so it never
    learns to answer them (a stage with none in the batch adds 0). ``None``
    (for the list or a stage) trains on every sample.
    """
    k = logits.shape[1]
    flat = rearrange(logits, "b k c -> (b k) c")
    if trained_classes is None or all(classes is None for classes in trained_classes):
        return F.cross_entropy(flat, labels.repeat_interleave(k)) * k
    if len(trained_classes) != k:
        raise ValueError(
            f"trained_classes needs {k} entries (one per stage), got {len(trained_classes)}"
        )
    per_sample = F.cross_entropy(flat, labels.repeat_interleave(k), reduction="none")
    per_sample = rearrange(per_sample, "(b k) -> b k", k=k)
    weights = torch.stack(
        [
            torch.ones_like(labels, dtype=per_sample.dtype)
            if classes is None
            else torch.isin(labels, torch.tensor(sorted(classes), device=labels.device)).to(
                per_sample.dtype
            )
            for classes in trained_classes
        ],
        dim=1,
    )  # (batch, stage)
    return ((per_sample * weights).sum(0) / weights.sum(0).clamp_min(1)).sum()


def batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches drawn from ``generator`` (CPU)."""
    order = torch.randperm(num_samples, generator=generator)
    return list(order.split(batch_size))


def trained_classes_of(cascade: Cascade) -> list[frozenset[int] | None]:
    """Each classifier's ``trained_classes`` attribute (a specialist's classes), else None."""
    return [
        None if (classes := getattr(clf, "trained_classes", None)) is None else frozenset(classes)
        for clf in cascade.classifiers
    ]


class ClassifierFitting:
    """Adam on every stage's cross-entropy, one epoch at a time, resumable mid-training.

    :func:`fit_classifiers` runs it to the end; a caller that checkpoints between epochs
    keeps :meth:`state_dict` (optimiser moments and the shuffle generator) with the
    cascade's weights, and a fitting restored with :meth:`load_state_dict` continues
    exactly as if it had never stopped.
    """

    def __init__(
        self,
        cascade: Cascade,
        train: Split,
        lr: float = 3e-3,
        batch_size: int = 64,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ):
        self.cascade, self.batch_size = cascade, batch_size
        self.device = next(cascade.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = build_optimizer("adam", cascade.parameters(), lr, weight_decay)
        self.trained_classes = trained_classes_of(cascade)
        self.x, self.y = train.x.to(self.device), train.y.to(self.device)

    def run_epoch(self) -> None:
        """One shuffled pass over the training split, the cascade in training mode."""
        self.cascade.train()
        for idx in batches(len(self.y), self.batch_size, self.generator):
            idx = idx.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.cascade(self.x[idx])
            cross_entropy_all_stages(logits, self.y[idx], self.trained_classes).backward()
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state and the shuffle generator's (the weights are the cascade's)."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (load the cascade's weights separately)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())


def fit_classifiers(
    cascade: Cascade,
    train: Split,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    on_epoch: Callable[[int], None] | None = None,
) -> Cascade:
    """Train every stage with Adam on cross-entropy, honouring specialists' ``trained_classes``.

    ``on_epoch(epoch)`` is called after each epoch (epochs count from 1). Returns the
    cascade in eval mode.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    fitting = ClassifierFitting(cascade, train, lr, batch_size, weight_decay, seed)
    for epoch in range(1, epochs + 1):
        fitting.run_epoch()
        if on_epoch is not None:
            on_epoch(epoch)
    return cascade.eval()
