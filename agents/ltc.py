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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from policycascade.agents.rules import stop_decisions
from policycascade.cascade import Cascade
from policycascade.costs import StageCosts, count_macs
from policycascade.data import Split
from policycascade.evaluation import first_stop
from policycascade.optimizers import build_optimizer
from policycascade.supervised import batches, cross_entropy_all_stages

WEIGHT_DECAY = 1e-4  # Adam weight decay, the same as cross-entropy pre-training's default


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


@dataclass(frozen=True)
class OptimizerSpec:
    """How each LtC model is optimised: Adam (default) or SGD with momentum, step schedule."""

    name: str = "adam"
    weight_decay: float = WEIGHT_DECAY
    milestones: tuple[int, ...] = ()  # epochs after which the lr is multiplied by ``gamma``
    gamma: float = 0.1


# Called after every epoch of every model with the state to resume from (see ``_fit``).
AfterEpoch = Callable[[dict[str, Any]], None]


def _fit(
    module: nn.Module,
    loss_of_batch: Callable[[torch.Tensor], torch.Tensor],
    num_samples: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    spec: OptimizerSpec | None = None,
    resume: dict[str, Any] | None = None,
    after_epoch: AfterEpoch | None = None,
) -> None:
    """Optimise ``loss_of_batch(indices)`` over shuffled epochs drawn from ``seed``.

    ``after_epoch`` receives ``{"epoch", "optimizer", "schedule", "generator"}`` after
    each epoch; passing that dict back as ``resume`` (with the module's weights
    restored) continues exactly where it was taken.
    """
    spec = spec or OptimizerSpec()
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(spec.name, module.parameters(), lr, spec.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(spec.milestones), spec.gamma)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        generator.set_state(resume["generator"].cpu())
        start = int(resume["epoch"])
    module.train()
    for epoch in range(start, epochs):
        for idx in batches(num_samples, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss_of_batch(idx).backward()
            optimizer.step()
        schedule.step()
        if after_epoch is not None:
            module.eval()
            after_epoch(
                {
                    "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                }
            )
            module.train()
    module.eval()


def _resume_point(resume: dict[str, Any] | None, epochs: int) -> tuple[int, dict | None]:
    """(first part still to train, its fit state) from a progress dict ``{"part", "fit"}``."""
    if resume is None:
        return 0, None
    part, fit = int(resume["part"]), resume["fit"]
    if fit is not None and int(fit["epoch"]) >= epochs:  # that part had finished
        return part + 1, None
    return part, fit


@torch.no_grad()
def _correct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024):
    """Booleans (sample,): where the frozen ``module`` (eval mode) predicts the label."""
    module.eval()
    pred = torch.cat(
        [module(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
    )
    return pred == y


def train_ltc_cascade(
    cascade: Cascade,
    train: Split,
    cost: float = 0.5,
    weight: float = 1.0,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    spec: OptimizerSpec | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    after_epoch: AfterEpoch | None = None,
) -> Cascade:
    """Train separate classifiers sequentially by eq. (5); returns the cascade in eval mode.

    The most expensive classifier is trained first with plain cross-entropy.
    Then, from the most expensive down, classifier m is trained with the LtC
    loss with classifier m + 1 (already trained, frozen, in eval mode) as its
    expensive model; that model's correctness on each training sample is fixed
    and computed once. Only the classifier being trained is updated. Stage m
    draws its batches from ``seed + m`` (Adam, weight decay ``WEIGHT_DECAY``).

    Progress is in parts (part 0: the last classifier, part p: classifier k - 1 - p);
    ``after_epoch`` gets ``{"part", "fit"}`` after each epoch, and the same dict as
    ``resume`` (with the weights restored) continues from there.
    """
    device = next(cascade.parameters()).device
    x, y = train.x.to(device), train.y.to(device)
    aug = augment or (lambda batch: batch)  # per-batch training augmentation
    k = cascade.num_stages
    first_part, fit_state = _resume_point(resume, epochs)
    for part, m in enumerate(reversed(range(k))):
        if part < first_part:
            continue
        model = cascade.classifiers[m]
        if m == k - 1:  # the most expensive model: plain cross-entropy

            def loss_of_batch(i: torch.Tensor, model=model):
                return F.cross_entropy(model(aug(x[i])), y[i])

        else:
            expensive_correct = _correct(cascade.classifiers[m + 1], x, y)

            def loss_of_batch(i: torch.Tensor, model=model, expensive_correct=expensive_correct):
                return ltc_loss(model(aug(x[i])), y[i], expensive_correct[i], cost, weight)

        report = None if after_epoch is None else _report_part(after_epoch, part)
        _fit(
            model, loss_of_batch, len(y), epochs, lr, batch_size, seed + m, spec, fit_state, report
        )
        fit_state = None
    return cascade.eval()


def _report_part(after_epoch: AfterEpoch, part: int) -> AfterEpoch:
    return lambda fit: after_epoch({"part": part, "fit": fit})


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


def train_ltc_multi_exit(
    net: MultiExitNet,
    train: Split,
    cost: float = 0.5,
    weight: float = 1.0,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    spec: OptimizerSpec | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    after_epoch: AfterEpoch | None = None,
) -> MultiExitNet:
    """Train every exit at once with the summed loss of eq. (6); returns the net in eval mode.

    One part (0); ``resume`` and ``after_epoch`` as in :func:`train_ltc_cascade`.
    """
    device = next(net.parameters()).device
    x, y = train.x.to(device), train.y.to(device)
    aug = augment or (lambda batch: batch)
    first_part, fit_state = _resume_point(resume, epochs)
    if first_part == 0:
        _fit(
            net,
            lambda i: multi_exit_ltc_loss(net(aug(x[i])), y[i], cost, weight),
            len(y),
            epochs,
            lr,
            batch_size,
            seed,
            spec,
            fit_state,
            None if after_epoch is None else _report_part(after_epoch, 0),
        )
    return net.eval()


class LtcThresholdRule:
    """Stop at stage t when the max softmax is >= ``thresholds[t]``; the last stage always stops.

    A threshold of +inf never stops. The rule reads a softmax the classifier
    already produced, so it costs no MACs.
    """

    def __init__(self, thresholds: list[float]):
        if len(thresholds) < 1:
            raise ValueError("a cascade needs at least 2 stages, so at least 1 threshold")
        self.thresholds = [float(d) for d in thresholds]  # K - 1 values

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.thresholds) + 1

    def stop_at_stage(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Stop decisions (batch,) at ``stage`` from that stage's softmax (batch, C)."""
        if stage >= len(self.thresholds):
            return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        return probs.max(-1).values >= self.thresholds[stage]

    def policy_macs(self) -> list[int]:
        """Zero at every stage."""
        return [0] * self.num_stages

    def __repr__(self) -> str:
        return f"LtcThresholdRule(thresholds={self.thresholds})"


def _best_threshold(
    conf: torch.Tensor,
    reached: torch.Tensor,
    gain_correct: torch.Tensor,
    gain_macs: torch.Tensor,
    base_correct: int,
    base_macs: int,
    required_correct: float,
) -> tuple[float, int, int]:
    """Cheapest feasible threshold for one stage, every candidate evaluated at once.

    ``gain_*`` (sample,) is what stopping a reached sample here changes in
    correct answers and MACs; the base is stopping nobody (threshold +inf).
    Returns (threshold, correct count, total MACs). Ties go to more correct
    answers, then to the higher threshold.
    """
    order = conf.argsort(descending=True)
    sorted_conf = conf[order]
    cum_correct = (gain_correct * reached)[order].cumsum(0)
    cum_macs = (gain_macs * reached)[order].cumsum(0)
    # With ">=", threshold sorted_conf[i] stops every sample up to the last tie of i.
    last_of_tie = torch.cat([sorted_conf[:-1] > sorted_conf[1:], torch.tensor([True])])
    thresholds = [float("inf")] + sorted_conf[last_of_tie].tolist()
    correct = base_correct + torch.cat(
        [torch.zeros(1, dtype=torch.int64), cum_correct[last_of_tie]]
    )
    total_macs = base_macs + torch.cat([torch.zeros(1, dtype=torch.int64), cum_macs[last_of_tie]])
    feasible = correct.double() >= required_correct
    best = feasible & (total_macs == total_macs[feasible].min())
    best &= correct == correct[best].max()
    i = int(best.nonzero()[0])  # candidates run from the highest threshold down
    return thresholds[i], int(correct[i]), int(total_macs[i])


def fit_ltc_thresholds(
    val_probs: torch.Tensor,
    val_labels: torch.Tensor,
    epsilon: float,
    costs: StageCosts,
    max_passes: int = 10,
) -> LtcThresholdRule:
    """Cheapest max-softmax thresholds whose validation accuracy is >= (1 - epsilon) x the last's.

    The paper's problem (section 3): minimise the cost subject to
    Acc_casc >= (1 - epsilon) Acc_exp, where Acc_exp is the last classifier's
    validation accuracy and the cost is the mean MACs per sample of
    ``evaluate_exits`` (every stage up to the exit, with ``costs``' classifier
    MACs; eq. (7) for K = 2). Candidate thresholds of a stage are its sorted
    unique validation confidences plus +inf (never stop).

    K = 2: one exact search over all candidates. K > 2: coordinate search
    starting from "never stop early" (feasible: it is the last classifier
    alone), optimising one threshold at a time exactly, given the others, from
    stage K - 2 down to stage 0 (the order of eq. (5)), and repeating passes
    until a pass lowers neither the cost nor raises the accuracy (at most
    ``max_passes``). Each step keeps the constraint, so the result is feasible
    and no single threshold can be changed to a cheaper feasible value, but it
    is not guaranteed to be the global optimum, nor monotone in ``epsilon``
    (the exact K = 2 search is both).

    Args:
        val_probs: (sample, K, C) softmaxes of the cascade's classifiers on validation.
        val_labels: (sample,) int64 labels.
        epsilon: accepted relative accuracy loss, in [0, 1); the paper uses 0.
        costs: the cascade's stage costs (``cascade.costs()``); the rule adds none.
        max_passes: cap on coordinate-search passes for K > 2.
    """
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    n, k, _ = val_probs.shape
    if val_labels.shape != (n,):
        raise ValueError(f"val_labels must have shape ({n},), got {tuple(val_labels.shape)}")
    if costs.num_stages != k:
        raise ValueError(f"val_probs has {k} stages but costs describe {costs.num_stages}")
    val_probs, val_labels = val_probs.cpu(), val_labels.cpu()
    conf = val_probs.max(-1).values  # (sample, stage)
    correct = (val_probs.argmax(-1) == val_labels.unsqueeze(1)).to(torch.int64)  # (sample, stage)
    cumulative = torch.tensor(costs.with_policy_macs([0] * k).cumulative_macs)
    required_correct = (1.0 - epsilon) * int(correct[:, -1].sum())
    rows = torch.arange(n)

    rule = LtcThresholdRule([float("inf")] * (k - 1))
    best = (int(cumulative[-1]) * n, -int(correct[:, -1].sum()))  # (total MACs, -correct)
    for _ in range(max_passes):
        start = best
        for t in reversed(range(k - 1)):
            stop = stop_decisions(rule, val_probs)  # (sample, stage)
            stop[:, t] = False
            exit_otherwise = first_stop(stop)  # where each sample exits if stage t never stops
            reached = ~stop[:, :t].any(1)
            correct_otherwise = correct[rows, exit_otherwise]
            macs_otherwise = cumulative[exit_otherwise]
            rule.thresholds[t], num_correct, total_macs = _best_threshold(
                conf[:, t],
                reached,
                correct[:, t] - correct_otherwise,
                cumulative[t] - macs_otherwise,
                int(correct_otherwise.sum()),
                int(macs_otherwise.sum()),
                required_correct,
            )
            best = (total_macs, -num_correct)
        if best >= start:
            break
    return rule
