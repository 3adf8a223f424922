"""A cascade of classifiers ordered by cost, and its cached outputs on a data split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from policycascade.costs import StageCosts, count_macs, eval_mode


class Cascade(nn.Module):
    """K >= 2 classifiers, cheapest first, that all map the same input to class logits.

    Costs are measured, never declared: each classifier's MACs are counted on one
    sample of shape ``input_shape`` the first time they are asked for.
    """

    def __init__(
        self,
        classifiers: Sequence[nn.Module],
        input_shape: Sequence[int],
        num_classes: int,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if len(classifiers) < 2:
            raise ValueError(f"a cascade needs at least 2 classifiers, got K={len(classifiers)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        names = list(names) if names is not None else [f"stage{t}" for t in range(len(classifiers))]
        if len(names) != len(classifiers):
            raise ValueError(f"got {len(names)} names for {len(classifiers)} classifiers")
        self.classifiers = nn.ModuleList(classifiers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.names = names
        self._classifier_macs: list[int] | None = None

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.classifiers)

    def classifier_macs(self) -> list[int]:
        """MACs per sample of each classifier, measured once on a zero input."""
        if self._classifier_macs is None:
            device = next(self.parameters()).device
            sample = torch.zeros(1, *self.input_shape, device=device)
            macs = []
            for name, clf in zip(self.names, self.classifiers, strict=True):
                out = _check_logits(clf, sample, self.num_classes, name)
                del out
                macs.append(count_macs(clf, sample))
            self._classifier_macs = macs
        return self._classifier_macs

    def alone_macs(self) -> list[int]:
        """MACs per sample of each classifier used on its own (here: ``classifier_macs``)."""
        return self.classifier_macs()

    def costs(self, policy_macs: Sequence[int] | None = None) -> StageCosts:
        """Per-stage costs with the given stopping rule's MACs per stage."""
        return StageCosts(
            self.classifier_macs(),
            list(policy_macs) if policy_macs else None,
            self.alone_macs(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every classifier, shape (batch, stage, class)."""
        logits = [clf(x) for clf in self.classifiers]
        for name, out in zip(self.names, logits, strict=True):
            if out.ndim != 2 or out.shape[-1] != self.num_classes:
                raise ValueError(
                    f"classifier {name!r} must map a batch to (batch, {self.num_classes}) logits, "
                    f"got output shape {tuple(out.shape)}"
                )
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def outputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        costs: StageCosts,
        batch_size: int = 1024,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> CascadeOutputs:
        """Run every classifier on a whole split in eval mode and cache the softmaxes.

        ``transform`` (e.g. uint8 -> normalised float) is applied to each batch on the device.
        """
        transform = transform or (lambda batch: batch)
        device = next(self.parameters()).device
        with eval_mode(self):
            logits = torch.cat(
                [
                    self(transform(x[i : i + batch_size].to(device)))
                    for i in range(0, len(x), batch_size)
                ]
            )
        return CascadeOutputs(
            probs=logits.float().softmax(-1), labels=y.to(device), costs=costs, names=self.names
        )


def _check_logits(
    clf: nn.Module, sample: torch.Tensor, num_classes: int, name: str
) -> torch.Tensor:
    with eval_mode(clf), torch.no_grad():
        out = clf(sample)
    if out.ndim != 2 or out.shape[-1] != num_classes:
        raise ValueError(
            f"classifier {name!r} must map a batch to (batch, {num_classes}) logits, "
            f"got output shape {tuple(out.shape)}"
        )
    return out


@dataclass
class CascadeOutputs:
    """Every classifier's softmax on every sample of a split, with the stage costs.

    All policies, learned or rule-based, are evaluated on these cached outputs,
    so they are compared on exactly the same classifier predictions.
    """

    probs: torch.Tensor  # (sample, stage, class), softmax probabilities
    labels: torch.Tensor  # (sample,), int64
    costs: StageCosts
    names: list[str] | None = None  # stage names, cheapest first; None: unnamed

    def __post_init__(self):
        if self.probs.ndim != 3:
            raise ValueError(f"probs must be (sample, stage, class), got {tuple(self.probs.shape)}")
        n, k, c = self.probs.shape
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(self.labels.shape)}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= c):
            raise ValueError(
                f"labels must be class indices in [0, {c}), "
                f"got values from {int(self.labels.min())} to {int(self.labels.max())}"
            )
        if k != self.costs.num_stages:
            raise ValueError(f"probs has {k} stages but costs describe {self.costs.num_stages}")
        if self.names is not None:
            self.names = [str(name) for name in self.names]
            if len(self.names) != k:
                raise ValueError(f"names must hold {k} stage names, got {self.names}")

    @property
    def num_samples(self) -> int:
        """Number of samples N."""
        return self.probs.shape[0]

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.probs.shape[2]

    def to(self, device: torch.device | str) -> CascadeOutputs:
        """The same outputs on another device."""
        return CascadeOutputs(self.probs.to(device), self.labels.to(device), self.costs, self.names)

    def with_costs(self, costs: StageCosts) -> CascadeOutputs:
        """The same predictions under another stopping rule's stage costs."""
        return CascadeOutputs(self.probs, self.labels, costs, self.names)
