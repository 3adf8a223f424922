"""Training through the run harness: learning, resume, NaN checks, precision, loading runs back."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policycascade.agents.reinforce_training import ReinforceTraining
from policycascade.config import ConfigError, ReinforceConfig, TrainConfig
from policycascade.harness import NonFiniteError, RunHarness
from policycascade.runs import load_run, train_run
from policycascade.supervised import cross_entropy_all_stages
from policycascade.train import main


def tiny(alpha: float = 0.01, **reinforce) -> TrainConfig:
    """The digits defaults on the CPU with a short REINFORCE schedule."""
    return TrainConfig(
        device="cpu", agent="reinforce", reinforce=ReinforceConfig(alpha=[alpha], **reinforce)
    )


def lengthen(run_dir, epochs: int) -> None:
    """Give a run more REINFORCE epochs: its checkpoint and its config.yaml, kept in step."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    state["config"]["reinforce"]["epochs"] = epochs
    torch.save(state, run_dir / "checkpoint.pt")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["reinforce"]["epochs"] = epochs
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.mark.parametrize("freeze", [False, True])
def test_short_training_raises_validation_reward(tmp_path, freeze):
    # Measured: the reward gains about 0.1 over its value at the policy's start within 6
    # REINFORCE epochs and stays there (joint and frozen alike).
    # (the stopping modules start untrained: no warm start)
    config = tiny(pretrain_epochs=15, epochs=10, freeze_classifiers=freeze, warm_start="none")
    harness = RunHarness(config, tmp_path / "run", alpha=0.01, show_progress=False)
    harness.run()
    rewards = [h["val/expected_reward"] for h in harness.history]
    assert len(rewards) == 25
    at_policy_start = rewards[config.reinforce.pretrain_epochs - 1]  # stopping modules untrained
    assert max(rewards[-3:]) > at_policy_start + 0.05


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # Bit-for-bit is promised on the CPU; CUDA kernels may differ run to run.
    fast = [
        "--agent",
        "reinforce",
        "--alpha",
        "0.01",
        "--pretrain-epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*fast, "--epochs", "2", "--logdir", str(tmp_path / "a")]) == 0
    assert main([*fast, "--epochs", "2", "--logdir", str(tmp_path / "b")]) == 0
    (full,) = (tmp_path / "a").iterdir()
    (other,) = (tmp_path / "b").iterdir()
    # A run that stopped after 2 of the 3 epochs, in the middle of REINFORCE: train 1 + 1,
    # then give it a second REINFORCE epoch and resume.
    assert main([*fast, "--epochs", "1", "--logdir", str(tmp_path / "c")]) == 0
    (short,) = (tmp_path / "c").iterdir()
    lengthen(short, 2)
    assert main(["--resume", str(short), "--no-progress"]) == 0
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((other / "metrics.json").read_text())
    c = json.loads((short / "metrics.json").read_text())
    assert a["epochs_trained"] == c["epochs_trained"] == 3
    assert a == b  # same seed, same config: identical metrics
    assert c == a  # stopped after 2 of 3 epochs and resumed: identical too


def test_non_finite_loss_stops_naming_epoch_step_and_stage_and_keeps_last_checkpoint(
    tmp_path, monkeypatch
):
    original = ReinforceTraining.train_epoch

    def poisoned_second_epoch(self, epoch):
        if epoch == 1:
            with torch.no_grad():
                self.cascade.classifiers[2][1].weight.fill_(float("nan"))
        return original(self, epoch)

    monkeypatch.setattr(ReinforceTraining, "train_epoch", poisoned_second_epoch)
    run_dir = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"epoch 2, step 1: classifier stage 2 \('mlp-256'\).*checkpoint \(epoch 1\)",
    ):
        train_run(tiny(pretrain_epochs=3, epochs=0), run_dir, show_progress=False)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1
    cascade = saved["state"]["cascade"]
    assert all(torch.isfinite(v).all() for v in cascade.values() if v.is_floating_point())
    assert not (run_dir / "metrics.json").exists()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [1]
    assert not math.isnan(events.Scalars("val/accuracy")[0].value)


def test_bf16_autocast_and_channels_last_reach_the_classifiers(tmp_path):
    base = tiny(pretrain_epochs=1, epochs=1)
    fp32 = RunHarness(base, tmp_path, alpha=0.01, show_progress=False)
    config = dataclasses.replace(base, precision="bf16", channels_last=True)
    bf16 = RunHarness(config, tmp_path, alpha=0.01, show_progress=False)
    cnn = bf16.cascade.classifiers[-1]
    conv = next(m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = bf16.inputs(bf16.data.val.x[:64])
    assert x.is_contiguous(memory_format=torch.channels_last)
    bf16.cascade.load_state_dict(fp32.cascade.state_dict())
    low = bf16.eval_logits(bf16.cascade, bf16.data.val.x[:64])
    full = fp32.eval_logits(fp32.cascade, fp32.data.val.x[:64])
    assert low.dtype == full.dtype == torch.float32  # the policy and losses see fp32
    difference = float((low - full).abs().max())
    assert 0 < difference < 0.1 * float(full.abs().max())  # rounded to bf16, not another model
    x, y = bf16.split_on_device("train")
    cross_entropy_all_stages(bf16.classify(bf16.cascade, bf16.inputs(x[:64])), y[:64]).backward()
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
    harness = RunHarness(tiny(pretrain_epochs=1, epochs=0), tmp_path, 0.01, show_progress=False)
    weight = harness.cascade.classifiers[1][2].weight
    before = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=r"classifier stage 1 \('mlp-4x4'\).*step 1") as error:
        harness.algorithm.pretrain_step(torch.arange(64))
    assert "No checkpoint was written: the run failed in its first epoch" in str(error.value)
    assert torch.equal(weight.detach(), before)  # the optimiser never stepped


def _parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


@pytest.mark.parametrize("freeze", [False, True])
def test_joint_step_updates_the_policy_and_the_classifiers_unless_frozen(tmp_path, freeze):
    harness = RunHarness(
        tiny(pretrain_epochs=1, epochs=1, freeze_classifiers=freeze),
        tmp_path,
        0.01,
        show_progress=False,
    )
    training = harness.algorithm
    classifiers, policy = _parameters(training.cascade), _parameters(training.agent)
    step, supervised = training.joint_step(torch.arange(64), torch.arange(64, 96))
    assert step.returns.shape == (1, 32)  # (rollout, batch): the 32 held-out samples
    assert not torch.equal(_parameters(training.agent), policy)
    if freeze:
        assert float(supervised) == 0.0
        assert torch.equal(_parameters(training.cascade), classifiers)
    else:
        assert float(supervised) > 0.0
        assert not torch.equal(_parameters(training.cascade), classifiers)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2 + 1 epoch REINFORCE run: (config, run directory)."""
    config = tiny(pretrain_epochs=2, epochs=1)
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train_run(config, run_dir, show_progress=False)
    return config, run_dir


def test_load_run_gives_back_the_run_as_it_was_trained(tiny_run):
    config, run_dir = tiny_run
    run = load_run(run_dir)
    assert run.config == config and run.finished
    assert run.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert run.rule is not None
    test = run.outputs("test")
    assert test.probs.shape == (len(run.data.test.y), 4, 10)  # (sample, stage, class)
    assert torch.equal(test.labels, run.data.test.y)
    # The loaded cascade and policy score the test split exactly as the run did.
    again = run.evaluate("test")
    for key in ("accuracy", "mean_macs", "macs_share", "exit_distribution", "expected_reward"):
        assert again[key] == pytest.approx(run.metrics[key], rel=1e-6), key
    assert run.evaluate("val")["accuracy"] == pytest.approx(run.metrics["val"]["accuracy"])


def test_load_run_and_resume_refuse_a_run_whose_config_yaml_was_edited(tiny_run, tmp_path):
    config, original = tiny_run
    run_dir = tmp_path / "edited"
    shutil.copytree(original, run_dir)
    edited = yaml.safe_load((run_dir / "config.yaml").read_text())
    edited["reinforce"]["baseline"] = "none"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    message = r"config.yaml and the checkpoint disagree \(reinforce.baseline: 'none'"
    with pytest.raises(ConfigError, match=message):
        load_run(run_dir)
    with pytest.raises(ConfigError, match=message):
        train_run(config, run_dir, resume=True, show_progress=False)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 3  # untouched
