"""Cross-fitting's fold copies of a small cascade trained together, as one stacked model.

The fold copies' weights are stacked along a leading dimension
(:func:`torch.func.stack_module_state`); each step computes every copy's gradient in one
call (:func:`torch.func.grad`) and runs one Adam update on the stacked weights. Adam is
elementwise, so the stacked update equals each copy's own; every copy keeps its own initial
weights, shuffle generator, batch order, lr schedule and early stopping, and a copy with no
batch at a step (unequal folds) is left untouched, weights and optimiser state. The results
equal the one-at-a-time loop (:func:`policycascade.crossfit.cascade_fitter`,
:class:`policycascade.crossfit.ReferenceTraining`) up to floating-point reordering.

The copies' forward runs ``grouped`` (:func:`grouped_logits`: the copies' channels side by
side in one network, for Sequentials of plain layers such as the digits and specialist
cascades) or through ``vmap`` of :func:`torch.func.functional_call` (any other cascade).
On the CPU the digits fold units took 1.4x less CPU time grouped and 1.14x less with
``vmap`` (whose convolution and batch-norm rules are slower than plain calls): the CNN's
arithmetic, not per-call overhead, dominates them (docs/crossfit.md).

Dropout draws from torch's global generator in the loop's order, which per-copy ``vmap``
randomness cannot reproduce: :func:`stack_blocker` names such cascades, and
:func:`options_blocker` the training options stacking does not reproduce (SGD,
augmentation, bf16); callers train those in the loop.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from policycascade.cascade import Cascade
from policycascade.crossfit import (
    cascade_fitter,
    cross_fitted_outputs,
    fold_seed,
    logits_of,
    stratified_folds,
)
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.seeding import seeded
from policycascade.supervised import TrainingOptions, resolve_options, trained_classes_of

# torch.optim.Adam's defaults, which build_optimizer("adam", ...) keeps
BETAS, EPS = (0.9, 0.999), 1e-8
EVAL_BATCH = 1024  # crossfit.logits_of's batch
MODES = ("auto", "grouped", "vmap")  # auto: grouped where the cascade allows it


def stack_blocker(cascade: nn.Module) -> str | None:
    """Why ``cascade``'s copies cannot be trained stacked to the loop's results, or None.

    Dropout (per-copy randomness cannot replay the loop's draws from the global
    generator), frozen parameters (the loop's Adam skips them), and any forward that
    ``vmap`` refuses (tried on two copies of a two-sample batch in training mode).
    """
    for name, module in cascade.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return f"{name} is dropout: its random masks would not match the one-at-a-time loop"
    params = list(cascade.parameters())
    if not params:
        return "the cascade has no parameters"
    if not all(p.requires_grad for p in params):
        return "some parameters are frozen (requires_grad=False)"
    if len({(p.device, p.dtype) for p in params}) > 1:
        return "the parameters are on several devices or of several dtypes"
    trial = copy.deepcopy(cascade)
    params, buffers = stack_module_state([trial, trial])
    base = copy.deepcopy(trial).to("meta").train()
    x = torch.zeros(2, 2, *trial.input_shape, device=params[next(iter(params))].device)
    try:
        vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), randomness="error")(
            params, buffers, x
        )
    except Exception as error:  # noqa: BLE001 - any refusal means: use the loop
        return f"vmap cannot run its forward: {type(error).__name__}: {error}"
    return None


def options_blocker(options: TrainingOptions) -> str | None:
    """Why training with ``options`` cannot be stacked to the loop's results, or None.

    Stacked training is Adam in fp32 without augmentation (an lr schedule is fine).
    """
    if options.optimizer != "adam":
        return f"optimizer {options.optimizer!r}: only Adam is stacked"
    if options.augment:
        return "augmentation draws from a generator shared by the copies in the loop's order"
    if options.precision != "fp32":
        return f"precision {options.precision!r}: only fp32 is stacked"
    return None


def _stage_weights(trained_classes: Sequence[frozenset[int] | None], num_classes: int):
    """(C, K) float table: 1 where stage k trains on class c (a specialist's mask), else 0."""
    table = torch.ones(num_classes, len(trained_classes))
    for k, classes in enumerate(trained_classes):
        if classes is not None:
            table[:, k] = 0.0
            table[sorted(classes), k] = 1.0
    return table


_PER_CHANNEL = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def groupable(cascade: Cascade) -> bool:
    """Whether :func:`grouped_logits` can run ``cascade``: Sequentials of plain layers.

    Linear, Conv2d (zero padding), BatchNorm2d (affine, running statistics, a momentum),
    Flatten (all but the batch dimension) and per-channel layers without weights.
    """
    for clf in cascade.classifiers:
        if not isinstance(clf, nn.Sequential):
            return False
        for layer in clf:
            if isinstance(layer, nn.Conv2d):
                ok = layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            elif isinstance(layer, nn.BatchNorm2d):
                ok = layer.affine and layer.track_running_stats and layer.momentum is not None
            elif isinstance(layer, nn.Flatten):
                ok = layer.start_dim == 1 and layer.end_dim == -1
            else:
                ok = type(layer) in (nn.Linear, *_PER_CHANNEL)
            if not ok:
                return False
    return True


def _grouped_conv(
    layer: nn.Conv2d, h: torch.Tensor, params: dict[str, torch.Tensor], name: str, n: int
) -> torch.Tensor:
    """``layer`` of ``n`` copies on their channels side by side: one conv, n times the groups."""
    weight, bias = params[name + "weight"], params.get(name + "bias")
    return F.conv2d(
        h,
        weight.flatten(0, 1),
        None if bias is None else bias.flatten(),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups * n,
    )


def _grouped_batch_norm(
    layer: nn.BatchNorm2d,
    h: torch.Tensor,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    name: str,
    training: bool,
) -> torch.Tensor:
    """``layer`` of every copy as one batch norm over their channels; updates ``buffers``."""
    h = F.batch_norm(
        h,
        buffers[name + "running_mean"].view(-1),
        buffers[name + "running_var"].view(-1),
        params[name + "weight"].flatten(),
        params[name + "bias"].flatten(),
        training,
        layer.momentum,
        layer.eps,
    )
    if training:
        buffers[name + "num_batches_tracked"].add_(1)
    return h


def _grouped_linear(h: torch.Tensor, params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A Linear layer of every copy on its own (copy, batch, features) rows: a batched matmul."""
    bias = params.get(name + "bias")
    weight = params[name + "weight"].transpose(1, 2)
    return torch.bmm(h, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight)


def grouped_logits(
    base: Cascade,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """Logits (copy, batch, K, C) of stacked copies of a :func:`groupable` cascade.

    ``x`` is (copy, batch, ...): each copy's own inputs.
    The copies run as one network whose channels are the copies' channels side by side:
    convolutions with ``groups`` times the copies, one batch norm over all their
    channels (per-channel statistics, so per copy), linear layers as batched matmuls.
    Plain calls, so faster on the CPU than ``vmap``'s batching rules for convolutions
    and batch norm. In training mode the running statistics in ``buffers`` are updated
    in place, as each copy's own batch norm would.
    """
    n, b = x.shape[:2]
    outputs = []
    for t, clf in enumerate(base.classifiers):
        h, channels_side_by_side = x, False  # (copy, batch, ...) or (batch, copy * channel, ...)
        for i, layer in enumerate(clf):
            name = f"classifiers.{t}.{i}."
            if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)) and not channels_side_by_side:
                h = h.transpose(0, 1).flatten(1, 2)
                channels_side_by_side = True
            if isinstance(layer, nn.Conv2d):
                h = _grouped_conv(layer, h, params, name, n)
            elif isinstance(layer, nn.BatchNorm2d):
                h = _grouped_batch_norm(layer, h, params, buffers, name, training)
            elif isinstance(layer, nn.Flatten):
                h = (
                    h.flatten(1).unflatten(1, (n, -1)).transpose(0, 1)
                    if channels_side_by_side
                    else h.flatten(2)
                )
                channels_side_by_side = False
            elif isinstance(layer, nn.Linear):
                if channels_side_by_side:
                    raise ValueError(f"classifier {t} has a Linear layer on images: add a Flatten")
                h = _grouped_linear(h, params, name)
            elif channels_side_by_side:
                h = layer(h)
            else:
                h = layer(h.flatten(0, 1)).unflatten(0, (n, b))
        outputs.append(h)  # (copy, batch, C)
    return torch.stack(outputs, dim=2)


def _check_stacked_inputs(
    cascades: Sequence[Cascade],
    x: torch.Tensor,
    y: torch.Tensor,
    train_indices: Sequence[torch.Tensor],
    seeds: Sequence[int],
    mode: str,
) -> None:
    """Raise ValueError, naming the argument, where :class:`StackedFitting` cannot take these."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not cascades:
        raise ValueError("cascades must hold at least one cascade, got none")
    if not len(cascades) == len(train_indices) == len(seeds):
        raise ValueError(
            f"cascades, train_indices and seeds must be as long as each other, got "
            f"{len(cascades)}, {len(train_indices)} and {len(seeds)}"
        )
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    for c, idx in enumerate(train_indices):
        if len(idx) == 0:
            raise ValueError(f"train_indices[{c}] is empty: every copy needs samples")


def _flat_with_views(
    params: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One (copy, weight) tensor of the stacked ``params``, and each parameter as a view of it."""
    flat = torch.cat([p.detach().flatten(1) for p in params.values()], dim=1)
    views: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in params.items():
        size = p[0].numel()
        views[name] = flat[:, offset : offset + size].view(p.shape)
        offset += size
    return flat, views


class StackedFitting:
    """Adam on every stage's cross-entropy for several copies of one cascade at once.

    Copy c trains on rows ``train_indices[c]`` of ``x``/``y`` (in that order, as
    ``Split(x[idx], y[idx])`` would hold them) with a shuffle generator seeded by
    ``seeds[c]``, exactly as :class:`~policycascade.supervised.ClassifierFitting` would.
    """

    def __init__(
        self,
        cascades: Sequence[Cascade],
        x: torch.Tensor,
        y: torch.Tensor,
        train_indices: Sequence[torch.Tensor],
        seeds: Sequence[int],
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        mode: str = "auto",
        *,
        options: TrainingOptions | None = None,
    ):
        self.options = resolve_options(options, lr, batch_size, weight_decay)
        if (reason := options_blocker(self.options)) is not None:
            raise ValueError(f"options cannot be stacked: {reason}; train the copies in the loop")
        _check_stacked_inputs(cascades, x, y, train_indices, seeds, mode)
        self.cascades = list(cascades)
        self.batch_size = self.options.batch_size
        self.epochs_done = 0  # the lr schedule's epoch count
        self.device = next(cascades[0].parameters()).device
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.train_indices = [idx.to(self.device, torch.int64) for idx in train_indices]
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.base = copy.deepcopy(cascades[0]).to("meta")
        classes = trained_classes_of(cascades[0])
        self.stage_weights = (
            None
            if all(c is None for c in classes)
            else _stage_weights(classes, cascades[0].num_classes).to(self.device)
        )
        params, self.buffers = stack_module_state(self.cascades)
        # The copies' weights live as views of one (copy, weight) tensor: Adam is a few
        # elementwise ops on it per step, whatever the number of parameter tensors.
        self.flat, self.params = _flat_with_views(params)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.steps = torch.zeros(len(cascades), 1, dtype=torch.float64, device=self.device)
        if mode == "grouped" and not groupable(cascades[0]):
            raise ValueError("mode='grouped' needs a groupable cascade (see groupable); use 'vmap'")
        self.grouped = mode == "grouped" or (mode == "auto" and groupable(cascades[0]))
        self._grad = grad(self._loss)

    @property
    def num_copies(self) -> int:
        """How many copies train together."""
        return len(self.cascades)

    def _logits(self, params, buffers, x: torch.Tensor) -> torch.Tensor:
        """Every copy's logits (copy, batch, K, C) on its own inputs x (copy, batch, ...)."""
        if self.grouped:
            return grouped_logits(self.base, params, buffers, x, self.base.training)
        forward = vmap(
            lambda p, b, xb: functional_call(self.base, (p, b), (xb,)), randomness="error"
        )
        return forward(params, buffers, x)

    def _loss(self, params, buffers, xb, yb) -> torch.Tensor:
        """Sum over copies of :func:`~policycascade.supervised.cross_entropy_all_stages`."""
        logits = self._logits(params, buffers, xb)  # (copy, batch, K, C)
        k = logits.shape[2]
        per_sample = F.cross_entropy(
            rearrange(logits, "n b k c -> (n b k) c"),
            yb.repeat_interleave(k).flatten(),
            reduction="none",
        ).view(logits.shape[:3])  # (copy, batch, K)
        if self.stage_weights is None:
            return per_sample.mean(1).sum()
        weights = self.stage_weights[yb].to(per_sample.dtype)  # (copy, batch, K)
        return ((per_sample * weights).sum(1) / weights.sum(1).clamp_min(1)).sum()

    def run_epoch(self) -> None:
        """One shuffled pass of every copy over its own samples, in training mode.

        Step s takes batch s of every copy that has one; copies with equal batch sizes
        share one forward, and a copy without a batch at step s is left untouched.
        """
        self.base.train()
        o = self.options
        lr = o.lr * o.lr_gamma ** sum(m <= self.epochs_done for m in o.lr_milestones)  # MultiStepLR
        self.epochs_done += 1
        orders = [
            list(torch.randperm(len(idx), generator=g).split(self.batch_size))
            for idx, g in zip(self.train_indices, self.generators, strict=True)
        ]
        for step in range(max(len(o) for o in orders)):
            rows = {  # copy -> its batch's rows of x
                c: self.train_indices[c][order[step].to(self.device)]
                for c, order in enumerate(orders)
                if step < len(order)
            }
            if len(rows) == self.num_copies and len({len(r) for r in rows.values()}) == 1:
                batch = torch.stack(list(rows.values()))  # (copy, batch)
                grads = self._grad(self.params, self.buffers, self.x[batch], self.y[batch])
                self._adam(torch.cat([g.flatten(1) for g in grads.values()], dim=1), None, lr)
            else:
                self._masked_step(rows, lr)

    def _masked_step(self, rows: dict[int, torch.Tensor], lr: float) -> None:
        """A step where copies differ in batch size or some have none: a forward per size."""
        groups: dict[int, list[int]] = defaultdict(list)
        for c, r in rows.items():
            groups[len(r)].append(c)
        grad_flat = torch.zeros_like(self.flat)
        for copies in groups.values():
            pick = torch.tensor(copies, device=self.device)
            batch = torch.stack([rows[c] for c in copies])
            params = {k: v[pick] for k, v in self.params.items()}
            buffers = {k: v[pick] for k, v in self.buffers.items()}  # copies, updated in place
            grads = self._grad(params, buffers, self.x[batch], self.y[batch])
            grad_flat[pick] = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
            for k, v in buffers.items():
                self.buffers[k][pick] = v
        active = torch.zeros(self.num_copies, dtype=torch.bool, device=self.device)
        active[list(rows)] = True
        self._adam(grad_flat, active, lr)

    @torch.no_grad()
    def _adam(self, grad_flat: torch.Tensor, active: torch.Tensor | None, lr: float) -> None:
        """torch.optim.Adam's update (L2 weight decay) on the copies in ``active`` (None: all)."""
        if active is not None:
            rest = ~active
            kept = (self.flat[rest], self.exp_avg[rest], self.exp_avg_sq[rest])  # copies
            self.steps += active.unsqueeze(1)
        else:
            self.steps += 1
        beta1, beta2 = BETAS
        weight_decay = self.options.weight_decay
        g = grad_flat.add(self.flat, alpha=weight_decay) if weight_decay else grad_flat
        self.exp_avg.lerp_(g, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = (lr / (1 - beta1**self.steps)).to(self.flat.dtype)  # (copy, 1)
        bias_correction2_sqrt = (1 - beta2**self.steps).sqrt().to(self.flat.dtype)
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(EPS)
        self.flat.sub_(step_size * self.exp_avg / denom)
        if active is not None:
            self.flat[rest], self.exp_avg[rest], self.exp_avg_sq[rest] = kept

    @torch.no_grad()
    def val_accuracy(self, val: Split) -> torch.Tensor:
        """(copy, stage) accuracy on ``val`` in eval mode, a specialist's on its classes only.

        The same measure as :func:`policycascade.crossfit.stage_accuracy` (NaN for a stage
        with no sample of its classes).
        """
        self.base.eval()
        x, y = val.x.to(self.device), val.y.to(self.device)
        logits = torch.cat(
            [
                self._logits(
                    self.params,
                    self.buffers,
                    x[i : i + EVAL_BATCH].expand(self.num_copies, *x[i : i + EVAL_BATCH].shape),
                )
                for i in range(0, len(x), EVAL_BATCH)
            ],
            dim=1,
        )  # (copy, sample, K, C)
        correct = (logits.argmax(-1) == y.view(1, -1, 1)).double()  # (copy, sample, K)
        if self.stage_weights is None:
            keep = torch.ones(len(y), correct.shape[2], dtype=torch.double, device=self.device)
        else:
            keep = self.stage_weights[y].double()  # (sample, K)
        return (correct * keep).sum(1) / keep.sum(0)  # 0/0: NaN, as stage_accuracy

    def state(self) -> dict[str, torch.Tensor]:
        """Every copy's weights and buffers by state-dict name, (copy, ...) each."""
        return {**self.params, **self.buffers}

    def write_back(self, state: dict[str, torch.Tensor] | None = None) -> list[Cascade]:
        """Copy c of ``state`` (default: the current weights) into ``cascades[c]``, eval mode."""
        state = self.state() if state is None else state
        for c, cascade in enumerate(self.cascades):
            cascade.load_state_dict({k: v[c].detach().clone() for k, v in state.items()})
            cascade.eval()
        return self.cascades


def fit_stacked(
    cascades: Sequence[Cascade],
    x: torch.Tensor,
    y: torch.Tensor,
    train_indices: Sequence[torch.Tensor],
    seeds: Sequence[int],
    epochs: int = 40,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    val: Split | None = None,
    mode: str = "auto",
    *,
    options: TrainingOptions | None = None,
) -> list[Cascade]:
    """Train ``cascades[c]`` on rows ``train_indices[c]`` of ``x``/``y``, all copies at once.

    Without ``val``: what :func:`~policycascade.supervised.fit_classifiers` does to each
    copy (``seed=seeds[c]``, the same ``options``; ``lr``, ``batch_size`` and
    ``weight_decay`` are the older way to set three of them). With ``val``: what
    :class:`~policycascade.crossfit.ReferenceTraining` does, each classifier of each copy
    kept from its best validation epoch (the earliest wins ties). Copies must share one
    architecture (check :func:`stack_blocker` and :func:`options_blocker` first); their
    initial weights are theirs. Returns the cascades, trained in place, in eval mode.
    """
    if epochs < (1 if val is not None else 0):
        raise ValueError(f"epochs must be >= {1 if val is not None else 0}, got {epochs}")
    fitting = StackedFitting(
        cascades, x, y, train_indices, seeds, lr, batch_size, weight_decay, mode, options=options
    )
    best: dict[str, torch.Tensor] | None = None
    best_accuracy = torch.full((fitting.num_copies, cascades[0].num_stages), float("-inf"))
    stage_of = {name: int(name.split(".")[1]) for name in fitting.state()}  # classifiers.<t>.
    for epoch in range(1, epochs + 1):
        fitting.run_epoch()
        if val is None:
            continue
        accuracy = fitting.val_accuracy(val).cpu()
        better = accuracy > best_accuracy if epoch > 1 else torch.ones_like(accuracy, dtype=bool)
        best_accuracy = torch.where(better, accuracy, best_accuracy)
        if best is None:
            best = {k: v.detach().clone() for k, v in fitting.state().items()}
            continue
        for name, value in fitting.state().items():
            rows = better[:, stage_of[name]].to(value.device)
            if rows.any():
                best[name][rows] = value.detach()[rows]
    return fitting.write_back(best)


def stacked_cross_fitted_outputs(
    cascade_name: str,
    input_shape: Sequence[int],
    num_classes: int,
    x: torch.Tensor,
    y: torch.Tensor,
    folds: int = 5,
    seed: int = 0,
    epochs: int = 40,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    device: str | torch.device = "cpu",
    mode: str = "auto",
    *,
    options: TrainingOptions | None = None,
) -> torch.Tensor:
    """``cross_fitted_outputs(cascade_fitter(...), x, y, folds, seed)`` with the folds stacked.

    Fold f's copy is seeded as :func:`~policycascade.crossfit.cascade_fitter` seeds it
    (``build_cascade`` under ``seeded(fold_seed)``) and trains on the other folds in the
    same order. A cascade :func:`stack_blocker` refuses, or ``options``
    :func:`options_blocker` refuses, is trained in the loop instead. Returns held-out
    softmaxes (N, K, C) on the CPU.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    options = resolve_options(options, lr, batch_size, weight_decay)
    held_out = stratified_folds(y, folds, seed)
    seeds = [fold_seed(seed, fold, folds) for fold in range(folds)]
    cascades = []
    for s in seeds:
        with seeded(s):
            cascades.append(build_cascade(cascade_name, input_shape, num_classes).to(device))
    if stack_blocker(cascades[0]) is not None or options_blocker(options) is not None:
        fit = cascade_fitter(
            cascade_name, input_shape, num_classes, epochs, device=device, options=options
        )
        return cross_fitted_outputs(fit, x, y, folds, seed)
    kept = []
    for held in held_out:
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[held] = False
        kept.append(mask.nonzero().squeeze(1))  # ascending, as x[mask] orders them
    fit_stacked(cascades, x, y, kept, seeds, epochs, mode=mode, options=options)
    probs: torch.Tensor | None = None
    for cascade, held in zip(cascades, held_out, strict=True):
        fold_probs = logits_of(cascade, x[held]).float().softmax(-1).cpu()  # (held, K, C)
        if probs is None:
            probs = torch.empty(len(y), *fold_probs.shape[1:])
        probs[held] = fold_probs
    assert probs is not None  # folds >= 2
    return probs
