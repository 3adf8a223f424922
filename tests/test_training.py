import dataclasses
import json

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from policycascade.config import TrainConfig
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
    fast = ["--alpha", "0.01", "--pretrain-epochs", "2", "--no-progress"]
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
    with pytest.raises(NonFiniteError, match=r"epoch 2, step 1: classifier stage 2 \('mlp-256'\)"):
        trainer.run(writer)
    writer.close()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["cascade"].values() if v.is_floating_point())
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [1]
    assert not math.isnan(events.Scalars("val/accuracy")[0].value)
