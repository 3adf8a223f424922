"""The one classifier-training loop: every shared training option honoured, resumable."""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from policycascade.augment import random_crop_flip
from policycascade.cascade import Cascade
from policycascade.compare.reference import reference_key
from policycascade.config import TrainConfig
from policycascade.crossfit import ReferenceTraining
from policycascade.data import Split
from policycascade.optimizers import build_optimizer
from policycascade.seeding import seeded
from policycascade.supervised import (
    AUGMENT_STREAM,
    ClassifierFitting,
    TrainingOptions,
    cross_entropy_all_stages,
    fit_classifiers,
    trained_classes_of,
)

C = 3  # classes


class Recorder(nn.Module):
    """Identity that keeps every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return x


def image_cascade(seed=0):
    """Two small classifiers of (1, 8, 8) images; stage 0 records its training inputs."""
    torch.manual_seed(seed)
    first = nn.Sequential(Recorder(), nn.Flatten(), nn.Linear(64, C))
    second = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, C))
    return Cascade([first, second], (1, 8, 8), C)


def image_data(n=40):
    g = torch.Generator().manual_seed(7)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g))


def weights(cascade):
    return {k: v.clone() for k, v in cascade.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hand_loop(cascade, train, epochs, seed, name="adam", lr=3e-3, wd=1e-4, bs=64, lr_at=None):
    """The loop before TrainingOptions, written out; ``lr_at(epoch)`` sets the lr by hand."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(name, cascade.parameters(), lr, wd)
    classes = trained_classes_of(cascade)
    for epoch in range(1, epochs + 1):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch)
        cascade.train()
        for idx in torch.randperm(len(train.y), generator=generator).split(bs):
            optimizer.zero_grad(set_to_none=True)
            cross_entropy_all_stages(cascade(train.x[idx]), train.y[idx], classes).backward()
            optimizer.step()
    return cascade


def test_default_options_reproduce_the_hand_written_adam_loop_bit_for_bit():
    train = image_data()
    expected = weights(hand_loop(image_cascade(), train, 3, seed=5, lr=0.01, bs=16))
    old_call = image_cascade()
    fit_classifiers(old_call, train, 3, 0.01, 16, None, 5)  # the older positional call
    new_call = image_cascade()
    fit_classifiers(new_call, train, 3, seed=5, options=TrainingOptions(lr=0.01, batch_size=16))
    assert same_weights(weights(old_call), expected)
    assert same_weights(weights(new_call), expected)
    assert TrainingOptions.from_config(TrainConfig()) == TrainingOptions()


def test_sgd_with_milestones_multiplies_the_lr_after_each_milestone_epoch():
    train = image_data()
    options = TrainingOptions(optimizer="sgd", lr=0.1, lr_milestones=(2, 4), lr_gamma=0.5)
    cascade = image_cascade()
    fitting = ClassifierFitting(cascade, train, seed=1, options=options)
    assert isinstance(fitting.optimizer, torch.optim.SGD)
    assert fitting.optimizer.param_groups[0]["momentum"] == 0.9
    seen = []
    for _ in range(5):
        seen.append(fitting.optimizer.param_groups[0]["lr"])
        fitting.run_epoch()
    assert seen == [0.1, 0.1, 0.1 * 0.5, 0.1 * 0.5, 0.1 * 0.5 * 0.5]

    def lr_at(epoch):  # epochs count from 1; the lr drops after epochs 2 and 4
        return 0.1 * 0.5 ** sum(m < epoch for m in (2, 4))

    by_hand = hand_loop(image_cascade(), train, 5, seed=1, name="sgd", lr_at=lr_at)
    assert same_weights(weights(cascade), weights(by_hand))


def test_augmentation_changes_the_batches_only_when_on():
    train = image_data()
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(3)).split(16)
    plain = image_cascade()
    fit_classifiers(plain, train, 1, seed=3, options=TrainingOptions(batch_size=16))
    plain_seen = plain.classifiers[0][0].seen
    assert len(plain_seen) == len(order)
    assert all(torch.equal(x, train.x[idx]) for x, idx in zip(plain_seen, order, strict=True))

    augmented = image_cascade()
    options = TrainingOptions(batch_size=16, augment=True)
    fit_classifiers(augmented, train, 1, seed=3, options=options)
    generator = torch.Generator().manual_seed(3 + AUGMENT_STREAM)
    expected = [random_crop_flip(train.x[idx], 4, True, generator) for idx in order]
    seen = augmented.classifiers[0][0].seen
    assert all(torch.equal(x, e) for x, e in zip(seen, expected, strict=True))
    assert not all(torch.equal(x, train.x[idx]) for x, idx in zip(seen, order, strict=True))


def test_augmentation_of_inputs_that_are_not_float_images_is_refused():
    vectors = Split(torch.randn(10, 64), torch.zeros(10, dtype=torch.int64))
    cascade = Cascade([nn.Linear(64, C), nn.Linear(64, C)], (64,), C)
    with pytest.raises(ValueError, match="augment"):
        ClassifierFitting(cascade, vectors, options=TrainingOptions(augment=True))


def test_bf16_precision_autocasts_the_training_passes():
    dtypes = []
    cascade = image_cascade()
    cascade.classifiers[0][2].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    for precision in ("fp32", "bf16"):
        options = TrainingOptions(batch_size=40, precision=precision)
        fit_classifiers(cascade, image_data(), 1, options=options)
    assert dtypes == [torch.float32, torch.bfloat16]


def checkpointed(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_resume_mid_training_continues_bit_for_bit_with_a_schedule_and_augmentation():
    train = image_data()
    options = TrainingOptions(
        optimizer="sgd", lr=0.05, batch_size=16, augment=True, lr_milestones=(2, 3)
    )
    straight = image_cascade()
    fitting = ClassifierFitting(straight, train, seed=2, options=options)
    for _ in range(5):
        fitting.run_epoch()

    first = image_cascade()
    fitting = ClassifierFitting(first, train, seed=2, options=options)
    for _ in range(2):
        fitting.run_epoch()
    saved = checkpointed({"cascade": first.state_dict(), "fitting": fitting.state_dict()})
    resumed = image_cascade(seed=99)  # other initial weights: the checkpoint replaces them
    resumed.load_state_dict(saved["cascade"])
    fitting = ClassifierFitting(resumed, train, seed=123, options=options)
    fitting.load_state_dict(saved["fitting"])
    assert fitting.optimizer.param_groups[0]["lr"] == 0.05 * 0.1  # dropped after epoch 2
    for _ in range(3):
        fitting.run_epoch()
    assert fitting.optimizer.param_groups[0]["lr"] == 0.05 * 0.1 * 0.1
    assert same_weights(weights(resumed), weights(straight))


def test_a_state_saved_before_schedules_existed_still_loads():
    train = image_data()
    straight = image_cascade()
    fitting = ClassifierFitting(straight, train, seed=4)
    for _ in range(3):
        fitting.run_epoch()
    first = image_cascade()
    fitting = ClassifierFitting(first, train, seed=4)
    fitting.run_epoch()
    old_state = {k: fitting.state_dict()[k] for k in ("optimizer", "generator")}
    resumed = image_cascade()
    resumed.load_state_dict(first.state_dict())
    fitting = ClassifierFitting(resumed, train, seed=4)
    fitting.load_state_dict(checkpointed(old_state))
    for _ in range(2):
        fitting.run_epoch()
    assert same_weights(weights(resumed), weights(straight))


def test_reference_training_trains_with_the_options_and_resumes_with_them():
    train, val = image_data(), image_data(20)
    options = TrainingOptions(optimizer="sgd", lr=0.05, batch_size=16, lr_milestones=(1,))
    straight = ReferenceTraining(image_cascade(), train, val, epochs=3, options=options)
    assert isinstance(straight._fitting.optimizer, torch.optim.SGD)
    while not straight.done:
        straight.step()
    part = ReferenceTraining(image_cascade(), train, val, epochs=3, options=options)
    part.step()
    resumed = ReferenceTraining(image_cascade(), train, val, epochs=3, options=options)
    resumed.load_state_dict(checkpointed(copy.deepcopy(part.state_dict())))
    while not resumed.done:
        resumed.step()
    assert same_weights(weights(resumed.finish()), weights(straight.finish()))


CHANGED = {  # a value other than the default for every training option
    "optimizer": "sgd",
    "lr": 0.1,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "augment": True,
    "lr_milestones": (5,),
    "lr_gamma": 0.2,
    "precision": "bf16",
}


def test_options_come_from_the_config_fields_of_the_same_names():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(TrainingOptions)}
    for name, value in CHANGED.items():
        config_value = list(value) if name == "lr_milestones" else value
        config = dataclasses.replace(TrainConfig(), **{name: config_value})
        assert TrainingOptions.from_config(config) == TrainingOptions(**{name: value})


def test_the_reference_cache_key_differs_when_any_setting_differs():
    base = ("digits", "digits", 0, 40, TrainingOptions(), False)
    keys = {reference_key(*base)}
    assert reference_key(*base) == reference_key(*base)
    for name, value in CHANGED.items():
        options = dataclasses.replace(TrainingOptions(), **{name: value})
        keys.add(reference_key(*base[:4], options, False))
    for position, value in enumerate(("synthetic", "tiny", 1, 41)):
        keys.add(reference_key(*base[:position], value, *base[position + 1 :]))
    keys.add(reference_key(*base[:5], True))
    keys.add(reference_key(*base[:4], TrainingOptions(lr_milestones=(5, 6)), False))
    assert len(keys) == 1 + len(CHANGED) + 4 + 1 + 1


def test_bad_options_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="optimizer"):
        TrainingOptions(optimizer="rmsprop")
    with pytest.raises(ValueError, match="precision"):
        TrainingOptions(precision="fp16")
    with pytest.raises(ValueError, match="lr_milestones"):
        TrainingOptions(lr_milestones=(0,))
    with pytest.raises(TypeError, match="lr"):
        fit_classifiers(image_cascade(), image_data(), 1, lr=0.1, options=TrainingOptions())


def test_seeded_fixes_the_blocks_draws_and_restores_the_callers_generator():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    with seeded(3):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    assert torch.equal(inside, torch.rand(4))
