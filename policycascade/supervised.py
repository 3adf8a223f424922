"""Cross-entropy training of every classifier of a cascade, with the shared training options."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.optim.lr_scheduler import MultiStepLR

from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade
from policycascade.data import Split
from policycascade.optimizers import OPTIMIZERS, build_optimizer

if TYPE_CHECKING:
    from policycascade.config import TrainConfig


def cross_entropy_all_stages(
    logits: torch.Tensor,
    labels: torch.Tensor,
    trained_classes: Sequence[Collection[int] | None] | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over stages of each classifier's mean cross-entropy; ``logits`` is (batch, K, C).

    ``trained_classes[t]`` (a classifier's ``trained_classes`` attribute, e.g. a
    specialist's) restricts stage t's mean to the samples whose label is one of
    those classes: the others are masked out of that stage's loss, so it never
    learns to answer them (a stage with none in the batch adds 0). ``None``
    (for the list or a stage) trains on every sample.

    ``sample_weights`` (batch, K), non-negative, weighs each sample's cross-entropy at
    each stage: stage t's term is then ``sum_i w_it ce_it / sum_i w_it`` over the
    samples its ``trained_classes`` keep (a stage whose kept weights sum to 0 adds 0).
    ``None`` is the unweighted mean above, computed exactly as before.
    """
    k = logits.shape[1]
    flat = rearrange(logits, "b k c -> (b k) c")
    if sample_weights is not None:
        return _weighted_cross_entropy(flat, labels, k, trained_classes, sample_weights)
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


def _class_mask(
    labels: torch.Tensor, trained_classes: Sequence[Collection[int] | None] | None, k: int
) -> torch.Tensor:
    """(batch, K) 1 where stage t trains on the sample (its label among t's classes), else 0."""
    if trained_classes is None:
        return torch.ones(len(labels), k, device=labels.device)
    if len(trained_classes) != k:
        raise ValueError(
            f"trained_classes needs {k} entries (one per stage), got {len(trained_classes)}"
        )
    return torch.stack(
        [
            torch.ones(len(labels), device=labels.device)
            if classes is None
            else torch.isin(labels, torch.tensor(sorted(classes), device=labels.device)).float()
            for classes in trained_classes
        ],
        dim=1,
    )


def _weighted_cross_entropy(
    flat: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    trained_classes: Sequence[Collection[int] | None] | None,
    sample_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`cross_entropy_all_stages` with per-sample, per-stage weights (batch, K)."""
    if tuple(sample_weights.shape) != (len(labels), k):
        raise ValueError(
            f"sample_weights must have shape (batch, stages) = {(len(labels), k)}, "
            f"got {tuple(sample_weights.shape)}"
        )
    per_sample = F.cross_entropy(flat, labels.repeat_interleave(k), reduction="none")
    per_sample = rearrange(per_sample, "(b k) -> b k", k=k)
    weights = sample_weights.to(per_sample) * _class_mask(labels, trained_classes, k).to(per_sample)
    totals = weights.sum(0)
    stage_losses = (per_sample * weights).sum(0) / torch.where(totals > 0, totals, 1.0)
    return stage_losses.sum()


def check_sample_weights(sample_weights: torch.Tensor, num_samples: int, k: int) -> torch.Tensor:
    """``sample_weights`` as float32 if it is a finite, non-negative (num_samples, K) tensor."""
    if not isinstance(sample_weights, torch.Tensor):
        kind = type(sample_weights).__name__
        raise TypeError(f"sample_weights must be a torch.Tensor, got {kind}")
    if tuple(sample_weights.shape) != (num_samples, k):
        raise ValueError(
            f"sample_weights must have shape (train samples, stages) = {(num_samples, k)}, "
            f"got {tuple(sample_weights.shape)}"
        )
    weights = sample_weights.detach().float()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("sample_weights must be finite and >= 0")
    return weights


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


PRECISIONS = ("fp32", "bf16")
# The augmentation generator's seed is the fitting's seed plus this: a stream that no shuffle
# seed (config seeds are below 2**32) shares.
AUGMENT_STREAM = 2**32


@dataclass(frozen=True)
class TrainingOptions:
    """How classifiers are trained: the shared options every algorithm's training reads.

    The defaults are :class:`~policycascade.config.TrainConfig`'s: Adam at lr 3e-3, weight
    decay 1e-4, batches of 64, no augmentation, no lr schedule, fp32.
    """

    optimizer: str = "adam"  # 'adam' or 'sgd' (momentum 0.9)
    lr: float = 3e-3  # initial learning rate
    weight_decay: float = 1e-4  # L2 weight decay
    batch_size: int = 64  # training mini-batch size
    augment: bool = False  # 4-pixel pad, random crop and flip per image
    lr_milestones: tuple[int, ...] = ()  # epochs after which the lr is multiplied by ...
    lr_gamma: float = 0.1  # ... this factor
    precision: str = "fp32"  # 'fp32', or 'bf16' autocast of the classifiers' passes

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise TypeError(f"batch_size must be an int, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "lr_gamma", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.lr_gamma > 0:
            raise ValueError(f"lr_gamma must be > 0, got {self.lr_gamma}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be a bool, got {self.augment!r}")
        milestones = self.lr_milestones
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
            raise ValueError(f"lr_milestones must be epochs (ints >= 1), got {list(milestones)}")
        if len(set(milestones)) != len(milestones):
            raise ValueError(f"lr_milestones lists an epoch twice: {list(milestones)}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> TrainingOptions:
        """The shared training options of a :class:`~policycascade.config.TrainConfig`."""
        return cls(
            optimizer=config.optimizer,
            lr=float(config.lr),
            weight_decay=float(config.weight_decay),
            batch_size=config.batch_size,
            augment=config.augment,
            lr_milestones=tuple(config.lr_milestones),
            lr_gamma=float(config.lr_gamma),
            precision=config.precision,
        )

    def build_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimiser over ``params``."""
        return build_optimizer(self.optimizer, params, self.lr, self.weight_decay)

    def build_schedule(self, optimizer: torch.optim.Optimizer) -> MultiStepLR:
        """The lr schedule, stepped once per epoch (no milestones: a constant lr)."""
        return MultiStepLR(optimizer, milestones=list(self.lr_milestones), gamma=self.lr_gamma)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the classifiers' passes when ``precision`` is ``bf16``."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_options(
    options: TrainingOptions | None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
) -> TrainingOptions:
    """``options``, or the defaults with the older ``lr``/``batch_size``/``weight_decay`` set."""
    given = {
        name: value
        for name, value in (("lr", lr), ("batch_size", batch_size), ("weight_decay", weight_decay))
        if value is not None
    }
    if options is None:
        return TrainingOptions(**given)
    if not isinstance(options, TrainingOptions):
        raise TypeError(f"options must be a TrainingOptions, got {type(options).__name__}")
    if given:
        raise TypeError(
            f"give {', '.join(given)} inside options (TrainingOptions), not next to it: "
            f"got options and {given}"
        )
    return options


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The harness's training augmentation of a batch of inputs, in the batch's memory layout.

    4-pixel zero pad, random crop and horizontal flip per image
    (:func:`~policycascade.augment.random_crop_flip`, Guan et al. 4.4), as
    ``RunHarness.inputs(x, train=True)`` applies it to normalised images.
    """
    out = random_crop_flip(x, pad=4, flip=True, generator=generator)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class ClassifierFitting:
    """Every stage's cross-entropy, one epoch at a time, with the shared training options.

    ``options`` (:class:`TrainingOptions`) chooses the optimiser, lr schedule, weight
    decay, batch size, augmentation and precision, exactly as REINFORCE's pre-training
    reads them; ``lr``, ``batch_size`` and ``weight_decay`` are the older way to set three
    of them (give either those or ``options``). ``train.x`` holds model inputs (uint8
    images normalised by the caller). :func:`fit_classifiers` runs it to the end; a caller
    that checkpoints between epochs keeps :meth:`state_dict` (optimiser, lr schedule and
    generators) with the cascade's weights, and a fitting restored with
    :meth:`load_state_dict` continues exactly as if it had never stopped.
    """

    def __init__(
        self,
        cascade: Cascade,
        train: Split,
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        seed: int = 0,
        *,
        options: TrainingOptions | None = None,
        sample_weights: torch.Tensor | None = None,
    ):
        self.options = resolve_options(options, lr, batch_size, weight_decay)
        if self.options.augment and (train.x.ndim != 4 or not train.x.is_floating_point()):
            raise ValueError(
                "augment needs float image batches (batch, C, H, W); got inputs of dtype "
                f"{train.x.dtype} and shape {tuple(train.x.shape)} (normalise uint8 images first)"
            )
        self.cascade = cascade
        self.device = next(cascade.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)  # the shuffle
        self.augment_generator = torch.Generator(device=self.device).manual_seed(
            seed + AUGMENT_STREAM
        )
        self.optimizer = self.options.build_optimizer(cascade.parameters())
        self.schedule = self.options.build_schedule(self.optimizer)
        self.trained_classes = trained_classes_of(cascade)
        self.x, self.y = train.x.to(self.device), train.y.to(self.device)
        self.sample_weights: torch.Tensor | None = None
        self.set_sample_weights(sample_weights)

    def set_sample_weights(self, sample_weights: torch.Tensor | None) -> None:
        """Weigh each training sample's loss per stage from the next epoch on (None: unweighted).

        ``sample_weights`` is (train samples, K), finite and >= 0; see
        :func:`cross_entropy_all_stages`.
        """
        if sample_weights is not None:
            k = self.cascade.num_stages
            sample_weights = check_sample_weights(sample_weights, len(self.y), k).to(self.device)
        self.sample_weights = sample_weights

    def run_epoch(self) -> None:
        """One shuffled pass over the training split, the cascade in training mode."""
        self.cascade.train()
        for idx in batches(len(self.y), self.options.batch_size, self.generator):
            idx = idx.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            x = self.x[idx]
            if self.options.augment:
                x = augment_batch(x, self.augment_generator)
            with self.options.autocast(self.device):
                logits = self.cascade(x).float()
            weights = None if self.sample_weights is None else self.sample_weights[idx]
            cross_entropy_all_stages(logits, self.y[idx], self.trained_classes, weights).backward()
            self.optimizer.step()
        self.schedule.step()  # milestones count epochs, as in REINFORCE's pre-training

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, lr schedule and generators (the weights are the cascade's)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "schedule": self.schedule.state_dict(),
            "augment_generator": self.augment_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (load the cascade's weights separately).

        A state saved before schedules and augmentation existed (no ``schedule`` nor
        ``augment_generator``) came from a run with neither: they stay as built.
        """
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        if "augment_generator" in state:
            self.augment_generator.set_state(state["augment_generator"].cpu())


def fit_classifiers(
    cascade: Cascade,
    train: Split,
    epochs: int = 40,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    on_epoch: Callable[[int], None] | None = None,
    *,
    options: TrainingOptions | None = None,
    sample_weights: torch.Tensor | None = None,
) -> Cascade:
    """Train every stage on cross-entropy with ``options``, honouring specialists' classes.

    ``lr``, ``batch_size`` and ``weight_decay`` are the older way to set three of the
    options (see :class:`ClassifierFitting`). ``on_epoch(epoch)`` is called after each
    epoch (epochs count from 1). ``sample_weights`` (train samples, K) weighs each
    sample's loss at each stage (:func:`cross_entropy_all_stages`); None trains unweighted.
    Returns the cascade in eval mode.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    fitting = ClassifierFitting(
        cascade,
        train,
        lr,
        batch_size,
        weight_decay,
        seed,
        options=options,
        sample_weights=sample_weights,
    )
    for epoch in range(1, epochs + 1):
        fitting.run_epoch()
        if on_epoch is not None:
            on_epoch(epoch)
    return cascade.eval()
