"""Learning to Cascade (Enomoto & Eda, AAAI 2021): the LtC baseline.

LtC keeps the plain max-softmax threshold rule but trains each cheaper
classifier with an extra loss term, L_casc (eq. 3), that calibrates its
confidence for the cascade: low where only the next, more expensive classifier
is right, high everywhere else. Separate models are trained one after another
from the most expensive down (eq. 5); an early-exit network trains all exits at
once with the summed loss (eq. 6). The thresholds are then fitted on the
validation split: the cheapest cascade whose accuracy is at least
(1 - epsilon) times the last classifier's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policycascade.cascade import Cascade
from policycascade.costs import count_macs
from policycascade.supervised import cross_entropy_all_stages


def cascade_loss(
    fast_logits: torch.Tensor, labels: torch.Tensor, expensive_correct: torch.Tensor, cost: float
) -> torch.Tensor:
    """L_casc of eq. (3): pushes the fast model's confidence towards what the cascade needs.

    With conf_i the fast model's max-softmax probability on sample i::

        L_casc = mean_i [ conf_i * 1{fast wrong on i}
                          + (1 - conf_i) * (1{expensive wrong on i} + C) ]

    The expensive model enters only through its 0/1 correctness, so only conf
    carries a gradient: dL/dconf_i = 1{fast wrong} - 1{expensive wrong} - C,
    positive (confidence pushed down) only when the fast model is wrong and the
    expensive one right (for C < 1).

    Args:
        fast_logits: (batch, C) logits of the fast model.
        labels: (batch,) int64 class labels.
        expensive_correct: (batch,) booleans (or 0/1 floats), True where the
            expensive model's arg-max equals the label.
        cost: C, the price of one expensive-model call in units of the 0/1 loss
            (the paper uses 0.5).
    """
    if expensive_correct.shape != labels.shape:
        raise ValueError(
            f"expensive_correct must have the labels' shape {tuple(labels.shape)}, "
            f"got {tuple(expensive_correct.shape)}"
        )
    if not cost >= 0:
        raise ValueError(f"cost C must be >= 0, got {cost}")
    conf, prediction = fast_logits.softmax(-1).max(-1)
    fast_wrong = (prediction != labels).to(conf.dtype)
    expensive_wrong = 1.0 - expensive_correct.to(conf.dtype)
    return (conf * fast_wrong + (1.0 - conf) * (expensive_wrong + cost)).mean()


def ltc_loss(
    fast_logits: torch.Tensor,
    labels: torch.Tensor,
    expensive_correct: torch.Tensor,
    cost: float = 0.5,
    weight: float = 1.0,
) -> torch.Tensor:
    """The LtC objective of eq. (4): cross-entropy of the fast model plus ``weight`` x L_casc."""
    return F.cross_entropy(fast_logits, labels) + weight * cascade_loss(
        fast_logits, labels, expensive_correct, cost
    )


def multi_exit_ltc_loss(
    logits: torch.Tensor, labels: torch.Tensor, cost: float = 0.5, weight: float = 1.0
) -> torch.Tensor:
    """Eq. (6) for (batch, K, C) exit logits: every exit's cross-entropy plus w x L_casc per pair.

    Exit m is the fast model of the pair (m, m + 1); the correctness of exit
    m + 1 comes from the same forward pass and, being 0/1, carries no gradient.
    """
    k = logits.shape[1]
    correct = logits.argmax(-1) == labels.unsqueeze(1)  # (batch, stage)
    # All K - 1 pairs in one batch: the mean over (batch x pair) is the sum of
    # the per-pair means divided by K - 1.
    pairs = cascade_loss(
        logits[:, :-1].flatten(0, 1),
        labels.repeat_interleave(k - 1),
        correct[:, 1:].flatten(),
        cost,
    )
    return cross_entropy_all_stages(logits, labels) + weight * (k - 1) * pairs


class ExitClassifier(nn.Module):
    """One exit of a multi-exit network: the shared trunk up to its block, then its head."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.trunk = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, C)."""
        return self.head(self.trunk(x))


class MultiExitNet(nn.Module):
    """A small CNN for (1, 8, 8) digits with an exit head after each of its three blocks.

    The trunk is the digits cascade's CNN (8, 16, 32 channels, 3x3 convolutions
    with batch norm, 2x2 max-pooling after the second block). Each head
    average-pools the block's features to 2x2 and applies a linear layer.

    Cost differs from a cascade of separate models: reaching exit t reuses the
    features already computed for exit t - 1, so stage t costs only block t plus
    head t (``incremental_macs``), not the whole path to exit t. Running every
    exit costs the sum of the increments, which is what ``forward`` does.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.blocks = nn.ModuleList(
            [
                nn.Sequential(*conv(in_channels, 8)),
                nn.Sequential(*conv(8, 16), nn.MaxPool2d(2)),
                nn.Sequential(*conv(16, 32)),
            ]
        )
        self.heads = nn.ModuleList(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, num_classes))
                for c in (8, 16, 32)
            ]
        )
        self.input_shape = (in_channels, 8, 8)
        self.num_classes = num_classes

    @property
    def num_exits(self) -> int:
        """Number of exits K."""
        return len(self.blocks)

    def exits(self) -> list[ExitClassifier]:
        """Each exit as a stand-alone classifier that shares its modules with this net."""
        return [
            ExitClassifier(list(self.blocks[: t + 1]), self.heads[t]) for t in range(self.num_exits)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every exit in one pass through the trunk, shape (batch, stage, class)."""
        logits = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            logits.append(head(x))
        return torch.stack(logits, dim=1)

    def incremental_macs(self) -> list[int]:
        """MACs per sample that stage t adds: block t on the previous features plus head t."""
        device = next(self.parameters()).device
        features = torch.zeros(1, *self.input_shape, device=device)
        macs = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for block, head in zip(self.blocks, self.heads, strict=True):
                block_macs = count_macs(block, features)
                features = block(features)
                macs.append(block_macs + count_macs(head, features))
        self.train(was_training)
        return macs

    def as_cascade(self) -> MultiExitCascade:
        """The exits as a cascade whose stages cost only their increments."""
        return MultiExitCascade(self)


class MultiExitCascade(Cascade):
    """A ``Cascade`` over the exits of a ``MultiExitNet``, priced by incremental MACs.

    ``classifier_macs()[t]`` is block t plus head t, so ``StageCosts``'
    cumulative MACs are what a sample exiting at t really spends. Each exit used
    alone (``alone_macs``) runs the trunk up to it plus its head, and the last
    exit alone is the reference of ``macs_share``.
    """

    def __init__(self, net: MultiExitNet):
        super().__init__(net.exits(), net.input_shape, net.num_classes)
        self.net = net

    def classifier_macs(self) -> list[int]:
        """Incremental MACs of each stage (earlier blocks are reused, not re-run)."""
        return self.net.incremental_macs()

    def alone_macs(self) -> list[int]:
        """MACs of each exit as a stand-alone classifier: its blocks and its head."""
        return super().classifier_macs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every exit (batch, stage, class), running the trunk once."""
        return self.net(x)
