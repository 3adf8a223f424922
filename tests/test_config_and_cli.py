import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policycascade.config import ConfigError, TrainConfig, config_from_dict, load_config_file
from policycascade.train import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--pretrain-epochs", "3", "--epochs", "2", "--no-progress"]


def test_digits_yaml_equals_the_defaults():
    assert config_from_dict(load_config_file(ROOT / "configs" / "digits.yaml")) == TrainConfig()


def test_unknown_key_gets_did_you_mean_and_bad_types_name_the_field():
    with pytest.raises(ConfigError, match="unknown config key 'baselin'; did you mean 'baseline'"):
        config_from_dict({"baselin": "none"})
    with pytest.raises(ConfigError, match="epochs must be an integer, got 'ten'"):
        config_from_dict({"epochs": "ten"})
    with pytest.raises(ConfigError, match="alpha must be finite and >= 0, got -0.1"):
        config_from_dict({"alpha": -0.1})
    with pytest.raises(ConfigError, match="baseline must be one of"):
        config_from_dict({"baseline": "mean"})
    with pytest.raises(ConfigError, match="leave-one-out' needs rollouts >= 2"):
        config_from_dict({"baseline": "leave-one-out"})


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    for flag in ("--config", "--resume", "--device", "--logdir"):
        assert flag in text
    # each config option states its own default once; the CLI's None placeholder never shows
    assert "default: None" not in text
    assert "(default: digits)" in " ".join(text.split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--alpha", "-1"], "alpha must be finite and >= 0"),
        (["--config", "missing.yaml"], "does not exist"),
        (["--resume", "no/such/run"], "no checkpoint"),
    ],
)
def test_usage_errors_exit_2_without_traceback(argv, message, capsys, tmp_path):
    extra = [] if argv[0] == "--resume" else ["--logdir", str(tmp_path)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_cli_writes_run_directory(tmp_path, capsys):
    assert main(["--alpha", "0.01", "--logdir", str(tmp_path), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "learned policy" in printed and "cnn alone" in printed
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("digits__reinforce__optimal-constant__a0.01__s0__")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "mean_macs", "macs_share", "exit_distribution", "single_classifiers"):
        assert key in metrics
    assert len(metrics["single_classifiers"]) == 4
    assert sum(metrics["exit_distribution"]) == pytest.approx(1.0)
    assert (run / "checkpoint.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["alpha"] == [0.01]
    events = EventAccumulator(str(run))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in (
        "train/reward",
        "train/grad_variance",
        "val/accuracy",
        "val/macs_share",
        "val/exit_share/stage0",
        "pretrain/loss",
        "hparam/accuracy",
    ):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("val/accuracy")] == list(range(1, 6))


def test_alpha_sweep_gives_one_run_per_alpha(tmp_path):
    assert main(["--alpha", "0.001", "0.1", "--logdir", str(tmp_path), *FAST]) == 0
    assert len(list(tmp_path.iterdir())) == 2


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "policycascade.train", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--alpha" in result.stdout


def test_a_value_error_inside_training_is_a_bug_with_a_traceback_not_a_usage_error(
    tmp_path, monkeypatch
):
    from policycascade.trainer import Trainer

    def broken_epoch(self):
        raise ValueError("shapes do not line up")

    monkeypatch.setattr(Trainer, "_pretrain_epoch", broken_epoch)
    argv = ["--pretrain-epochs", "1", "--epochs", "0", "--no-progress", "--logdir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="training failed unexpectedly: shapes do not line up"):
        main(argv)
