import dataclasses
import json

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from policycascade.config import TrainConfig
from policycascade.supervised import cross_entropy_all_stages
from policycascade.train import main
from policycascade.trainer import Trainer


@pytest.mark.parametrize("freeze", [False, True])
def test_short_training_raises_validation_reward(tmp_path, freeze):
    config = dataclasses.replace(
        TrainConfig(), pretrain_epochs=15, epochs=25, freeze_classifiers=freeze
    )
    trainer = Trainer(config, alpha=0.01, run_dir=tmp_path, show_progress=False)
    trainer.run(SummaryWriter(str(tmp_path)))
    rewards = [h["val/expected_reward"] for h in trainer.history]
    at_policy_start = rewards[config.pretrain_epochs - 1]  # stopping modules still untrained
    assert max(rewards[-3:]) > at_policy_start + 0.05


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # Bit-for-bit is promised on the CPU; CUDA kernels may differ run to run.
    fast = ["--alpha", "0.01", "--pretrain-epochs", "2", "--no-progress", "--device", "cpu"]
    assert main([*fast, "--epochs", "4", "--logdir", str(tmp_path / "a")]) == 0
    assert main([*fast, "--epochs", "4", "--logdir", str(tmp_path / "b")]) == 0
    (full,) = (tmp_path / "a").iterdir()
    (other,) = (tmp_path / "b").iterdir()
    # Rewind run b to its state after epoch 3 by retraining 3 epochs, then resume it.
    assert main([*fast, "--epochs", "1", "--logdir", str(tmp_path / "c")]) == 0
    (short,) = (tmp_path / "c").iterdir()
    state = torch.load(short / "checkpoint.pt", weights_only=False)
    state["config"]["epochs"] = 4
    torch.save(state, short / "checkpoint.pt")
    assert main(["--resume", str(short), "--no-progress"]) == 0
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((other / "metrics.json").read_text())
    c = json.loads((short / "metrics.json").read_text())
    assert a == b  # same seed, same config: identical metrics
    assert c == a  # stopped after 3 of 6 epochs and resumed: identical too


def test_non_finite_loss_stops_naming_epoch_step_and_stage_and_keeps_last_checkpoint(tmp_path):
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from policycascade.trainer import NonFiniteError

    config = dataclasses.replace(TrainConfig(), pretrain_epochs=3, epochs=0)
    trainer = Trainer(config, alpha=0.01, run_dir=tmp_path, show_progress=False)
    original = trainer._pretrain_epoch

    def poisoned_second_epoch():
        if trainer.epoch == 1:
            with torch.no_grad():
                trainer.cascade.classifiers[2][1].weight.fill_(float("nan"))
        return original()

    trainer._pretrain_epoch = poisoned_second_epoch
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(
        NonFiniteError,
        match=r"epoch 2, step 1: classifier stage 2 \('mlp-256'\).*checkpoint \(epoch 1\)",
    ):
        trainer.run(writer)
    writer.close()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["cascade"].values() if v.is_floating_point())
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [1]
    assert not math.isnan(events.Scalars("val/accuracy")[0].value)


@pytest.mark.parametrize(
    "inputs, least_agreement",
    # a max over class positions is hard for a 16-unit module: measured 97.2% there
    [("sorted-log-probs", 0.98), ("log-probs", 0.9)],
)
def test_warm_start_imitates_the_best_reward_threshold_rule(tmp_path, inputs, least_agreement):
    from policycascade.agents.rules import stop_decisions
    from policycascade.agents.thresholds import ThresholdSearch

    config = dataclasses.replace(
        TrainConfig(), pretrain_epochs=3, epochs=1, policy_init="max-softmax", policy_inputs=inputs
    )
    trainer = Trainer(config, alpha=0.03, run_dir=tmp_path, show_progress=False)
    for _ in range(3):
        trainer._pretrain_epoch()
    report = trainer._warm_start_policy()
    val = trainer.outputs("val")
    rule = ThresholdSearch(val.probs, val.labels, trainer.costs, "max-softmax").for_reward(0.03)
    expected = stop_decisions(rule, val.probs)
    learned = stop_decisions(trainer.agent.policy, val.probs)
    assert 0.05 < float(expected[:, :-1].float().mean()) < 0.95  # the rule really decides
    agreement = float((learned[:, :-1] == expected[:, :-1]).float().mean())
    assert agreement >= least_agreement
    assert report["policy/warm_start_agreement"] == pytest.approx(agreement)


def test_bf16_autocast_and_channels_last_reach_the_classifiers(tmp_path):
    base = dataclasses.replace(TrainConfig(), pretrain_epochs=1, epochs=1, device="cpu")
    fp32 = Trainer(base, alpha=0.01, run_dir=tmp_path, show_progress=False)
    config = dataclasses.replace(base, precision="bf16", channels_last=True)
    bf16 = Trainer(config, alpha=0.01, run_dir=tmp_path, show_progress=False)
    cnn = bf16.cascade.classifiers[-1]
    conv = next(m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = bf16._inputs(bf16.data.val.x[:64])
    assert x.is_contiguous(memory_format=torch.channels_last)
    bf16.cascade.load_state_dict(fp32.cascade.state_dict())
    low, full = bf16._eval_logits(bf16.data.val.x[:64]), fp32._eval_logits(fp32.data.val.x[:64])
    assert low.dtype == full.dtype == torch.float32  # the policy and losses see fp32
    difference = float((low - full).abs().max())
    assert 0 < difference < 0.1 * float(full.abs().max())  # rounded to bf16, not another model
    x, y = bf16._split_on_device("train")
    cross_entropy_all_stages(bf16._classify(bf16.cascade, bf16._inputs(x[:64])), y[:64]).backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.cascade.parameters())


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizer_takes_the_same_step_as_the_default_one(name):
    from policycascade.optimizers import build_optimizer

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(name, a.parameters(), 0.05, weight_decay=1e-3)
    cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    extra = {"momentum": 0.9} if name == "sgd" else {}
    plain = cls(b.parameters(), lr=0.05, weight_decay=1e-3, **extra)
    x = torch.randn(16, 5)
    for _ in range(3):
        for model, optimizer in ((a, fused), (b, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("rmsprop", a.parameters(), 0.1)


def test_non_finite_gradient_with_finite_loss_stops_before_the_step(tmp_path):
    from policycascade.trainer import NonFiniteError

    config = dataclasses.replace(TrainConfig(), pretrain_epochs=1, epochs=0)
    trainer = Trainer(config, alpha=0.01, run_dir=tmp_path, show_progress=False)
    weight = trainer.cascade.classifiers[1][2].weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=r"classifier stage 1 \('mlp-4x4'\).*step 1") as error:
        trainer._pretrain_epoch()
    assert "No checkpoint was written: the run failed in its first epoch" in str(error.value)
    assert torch.equal(weight.detach(), before)  # the optimiser never stepped
