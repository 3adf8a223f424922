"""Stacked fold training equals training the fold copies one at a time."""

import copy
import functools

import pytest
import torch
from torch import nn

from policycascade import fold_stack
from policycascade.cascade import Cascade
from policycascade.crossfit import (
    cascade_fitter,
    cross_fitted_outputs,
    logits_of,
    stratified_folds,
    train_reference,
)
from policycascade.data import Split
from policycascade.data.specialist import SPECIALTY_CLASSES
from policycascade.fold_stack import StackedFitting, fit_stacked, stack_blocker
from policycascade.models import build_cascade, digits_classifiers
from policycascade.supervised import TrainingOptions

SHAPE = (1, 8, 8)
# Adam turns the gradient of a conv bias that batch norm cancels (~1e-9, pure rounding noise)
# into a step of about lr whatever its sign: stacking reorders that rounding, so the last
# stage (the CNN) agrees to ~1e-5 while the stages without batch norm agree to ~1e-7.
ATOL, ATOL_BATCH_NORM = 1e-6, 5e-5


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.rand(n, *SHAPE, generator=g) + y.view(-1, 1, 1, 1) / 10  # learnable a little
    return x, y


def assert_agree(stacked: torch.Tensor, loop: torch.Tensor) -> None:
    """(..., K, C) probabilities agree: the stages before the CNN to ATOL, the CNN less."""
    torch.testing.assert_close(stacked[..., :-1, :], loop[..., :-1, :], atol=ATOL, rtol=0)
    torch.testing.assert_close(stacked[..., -1, :], loop[..., -1, :], atol=ATOL_BATCH_NORM, rtol=0)


@functools.cache
def loop_cross_fitting(name: str) -> torch.Tensor:
    """The one-at-a-time reference of the unequal-folds test (computed once per cascade)."""
    x, y = data(97)
    fit = cascade_fitter(name, SHAPE, 10, epochs=2, batch_size=16)
    return cross_fitted_outputs(fit, x, y, folds=3, seed=0)


def batch_counts(y: torch.Tensor, folds: int, batch_size: int) -> list[int]:
    return [-(-(len(y) - len(held)) // batch_size) for held in stratified_folds(y, folds, 0)]


@pytest.mark.parametrize("mode", ["grouped", "vmap"])
@pytest.mark.parametrize("name", ["digits", "specialist"])
def test_stacked_cross_fitting_equals_the_loop_with_unequal_folds(name, mode):
    x, y = data(97)
    # 3 folds of 97: training sets of 64 and 65, so one copy skips the fifth step of every
    # epoch and the others' last batches differ in size from the full ones.
    assert sorted(set(batch_counts(y, 3, 16))) == [4, 5]
    loop = loop_cross_fitting(name)
    stacked = fold_stack.stacked_cross_fitted_outputs(
        name, SHAPE, 10, x, y, folds=3, seed=0, epochs=2, batch_size=16, mode=mode
    )
    assert stacked.shape == loop.shape == (97, build_cascade(name, SHAPE, 10).num_stages, 10)
    assert_agree(stacked, loop)


def test_specialist_stage_learns_nothing_from_other_classes():
    """A batch without the specialist's classes leaves its weights where weight decay puts them."""
    x, y = data(40)
    other = torch.tensor([c for c in range(10) if c not in SPECIALTY_CLASSES])
    rows = torch.nonzero(torch.isin(y, other)).squeeze(1)
    torch.manual_seed(0)
    cascade = build_cascade("specialist", SHAPE, 10)
    before = copy.deepcopy(cascade.classifiers[1].state_dict())
    fitting = StackedFitting([cascade], x, y, [rows], [0], batch_size=len(rows), weight_decay=0)
    fitting.run_epoch()
    after = fitting.write_back()[0].classifiers[1].state_dict()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["grouped", "vmap"])
def test_a_copy_without_a_batch_keeps_its_weights_and_optimiser_state(mode):
    x, y = data(48)
    torch.manual_seed(3)
    # without batch norm: the pre-norm conv biases' rounding noise (see ATOL) stays out
    cascades = [Cascade(digits_classifiers()[:3], SHAPE, 10) for _ in range(2)]
    # copy 0 has one batch per epoch, copy 1 three: copy 0 sits out steps 2 and 3
    rows = [torch.arange(16), torch.arange(48)]
    fitting = StackedFitting(cascades, x, y, rows, [0, 1], 3e-3, 16, mode=mode)
    alone = StackedFitting([copy.deepcopy(cascades[0])], x, y, rows[:1], [0], 3e-3, 16, mode=mode)
    for _ in range(2):
        fitting.run_epoch()
        alone.run_epoch()
    assert fitting.steps.squeeze(1).tolist() == [2, 6]
    torch.testing.assert_close(fitting.flat[0], alone.flat[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(fitting.exp_avg[0], alone.exp_avg[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(fitting.exp_avg_sq[0], alone.exp_avg_sq[0], atol=1e-12, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "mode", "options"),
    [
        ("digits", "vmap", TrainingOptions(batch_size=16)),
        ("specialist", "grouped", TrainingOptions(batch_size=16, lr_milestones=(2,), lr_gamma=0.3)),
    ],
)
def test_early_stopped_copies_equal_train_reference(name, mode, options):
    """With a validation split each copy's classifiers are kept from their own best epoch."""
    x, y = data(90)
    val = Split(*data(40, seed=1))
    indices = [torch.arange(0, 70), torch.arange(20, 90).flip(0)]  # any rows, in any order
    seeds = [11, 12]
    initial = []
    for s in seeds:
        torch.manual_seed(s)
        initial.append(build_cascade(name, SHAPE, 10))
    loop = [
        train_reference(copy.deepcopy(c), Split(x[i], y[i]), val, 4, seed=s, options=options)
        for c, i, s in zip(initial, indices, seeds, strict=True)
    ]
    stacked = fit_stacked(initial, x, y, indices, seeds, 4, val=val, mode=mode, options=options)
    for a, b in zip(stacked, loop, strict=True):
        assert not a.training
        assert_agree(logits_of(a, val.x).softmax(-1), logits_of(b, val.x).softmax(-1))


def dropout_cascade(name, input_shape, num_classes):
    return Cascade(
        [nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, num_classes)) for _ in "ab"],
        input_shape,
        num_classes,
    )


def test_dropout_cascades_fall_back_to_the_loop(monkeypatch):
    assert stack_blocker(build_cascade("digits", SHAPE, 10)) is None
    assert stack_blocker(build_cascade("specialist", SHAPE, 10)) is None
    assert "dropout" in stack_blocker(dropout_cascade("d", SHAPE, 10))
    monkeypatch.setattr(fold_stack, "build_cascade", dropout_cascade)
    monkeypatch.setattr("policycascade.crossfit.build_cascade", dropout_cascade)
    x, y = data(30)
    loop = cross_fitted_outputs(cascade_fitter("d", SHAPE, 10, epochs=2), x, y, folds=2)
    stacked = fold_stack.stacked_cross_fitted_outputs("d", SHAPE, 10, x, y, folds=2, epochs=2)
    torch.testing.assert_close(stacked, loop, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (TrainingOptions(optimizer="sgd"), "only Adam"),
        (TrainingOptions(augment=True), "augmentation"),
        (TrainingOptions(precision="bf16"), "only fp32"),
    ],
)
def test_options_the_stack_cannot_reproduce_fall_back_to_the_loop(options, reason):
    assert reason in fold_stack.options_blocker(options)
    x, y = data(30)
    with pytest.raises(ValueError, match=reason):
        StackedFitting(
            [build_cascade("digits", SHAPE, 10)], x, y, [torch.arange(30)], [0], options=options
        )
    if options.optimizer == "sgd":  # the loop itself, bit for bit
        fit = cascade_fitter("digits", SHAPE, 10, epochs=1, options=options)
        loop = cross_fitted_outputs(fit, x, y, folds=2)
        stacked = fold_stack.stacked_cross_fitted_outputs(
            "digits", SHAPE, 10, x, y, folds=2, epochs=1, options=options
        )
        torch.testing.assert_close(stacked, loop, atol=0, rtol=0)


def test_grouped_logits_equal_each_copy_run_alone():
    """Training-mode logits and running statistics of the side-by-side network, copy by copy."""
    torch.manual_seed(0)
    cascades = [build_cascade("digits", SHAPE, 10) for _ in range(3)]
    assert fold_stack.groupable(cascades[0])
    assert not fold_stack.groupable(dropout_cascade("d", SHAPE, 10))
    params, buffers = torch.func.stack_module_state(cascades)
    x = torch.rand(3, 7, *SHAPE)
    base = copy.deepcopy(cascades[0]).to("meta").train()
    logits = fold_stack.grouped_logits(base, params, buffers, x, training=True)
    for c, cascade in enumerate(cascades):
        torch.testing.assert_close(logits[c], cascade.train()(x[c]), atol=1e-5, rtol=0)
        for name, buffer in cascade.named_buffers():
            torch.testing.assert_close(buffers[name][c], buffer, atol=1e-6, rtol=0)


def test_mismatched_arguments_are_refused():
    x, y = data(20)
    cascade = build_cascade("digits", SHAPE, 10)
    with pytest.raises(ValueError, match="seeds"):
        StackedFitting([cascade], x, y, [torch.arange(20)], [0, 1])
    with pytest.raises(ValueError, match=r"train_indices\[0\] is empty"):
        StackedFitting([cascade], x, y, [torch.arange(0)], [0])
    with pytest.raises(ValueError, match="mode must be one of"):
        StackedFitting([cascade], x, y, [torch.arange(20)], [0], mode="fast")
    with pytest.raises(ValueError, match="x has 20 samples but y has 19"):
        StackedFitting([cascade], x, y[:19], [torch.arange(19)], [0])
