import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policycascade import cli, runs
from policycascade.agents.reinforce_training import ReinforceTraining
from policycascade.config import (
    ConfigError,
    ContinuationConfig,
    LtcConfig,
    ReinforceConfig,
    TrainConfig,
    config_from_args,
    config_from_dict,
    load_config_file,
)
from policycascade.runs import unique_run_dir
from policycascade.train import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--agent", "reinforce", "--pretrain-epochs", "3", "--epochs", "2", "--no-progress"]
TINY = [
    "--agent",
    "reinforce",
    "--pretrain-epochs",
    "1",
    "--epochs",
    "0",
    "--no-progress",
    "--device",
    "cpu",
]


def test_digits_yaml_equals_the_defaults():
    assert config_from_dict(load_config_file(ROOT / "configs" / "digits.yaml")) == TrainConfig()
    # every option is written out, so the file documents the defaults in full
    written = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    assert written == TrainConfig().to_dict()


def test_config_by_name_is_the_shipped_file():
    args = build_parser().parse_args(["--config", "digits"])
    assert config_from_args(args) == TrainConfig()
    args = build_parser().parse_args(["--config", "cifar10-resnet", "--seed", "3"])
    expected = config_from_dict(load_config_file(ROOT / "configs" / "cifar10-resnet.yaml"))
    assert config_from_args(args) == dataclasses.replace(expected, seed=3)
    with pytest.raises(ConfigError, match="'cifar10-resnte' is neither a file nor a shipped"):
        load_config_file("cifar10-resnte")


def test_unknown_key_gets_did_you_mean_and_bad_types_name_the_field():
    with pytest.raises(
        ConfigError, match="unknown reinforce section key 'baselin'; did you mean 'baseline'"
    ):
        config_from_dict({"agent": "reinforce", "reinforce": {"baselin": "none"}})
    with pytest.raises(
        ConfigError, match="unknown config key 'baselin'; did you mean 'baseline' in the 'reinf"
    ):
        config_from_dict({"baselin": "none"})
    with pytest.raises(ConfigError, match="unknown config key 'seeed'; did you mean 'seed'"):
        config_from_dict({"seeed": 1})
    with pytest.raises(ConfigError, match="epochs must be an integer, got 'ten'"):
        config_from_dict({"agent": "reinforce", "reinforce": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="alpha must be finite and >= 0, got -0.1"):
        config_from_dict({"agent": "reinforce", "reinforce": {"alpha": -0.1}})
    with pytest.raises(ConfigError, match="baseline must be one of"):
        config_from_dict({"agent": "reinforce", "reinforce": {"baseline": "mean"}})
    with pytest.raises(ConfigError, match="leave-one-out' needs rollouts >= 2"):
        config_from_dict({"agent": "reinforce", "reinforce": {"baseline": "leave-one-out"}})
    with pytest.raises(ConfigError, match=r"alpha lists a value twice: \[0.1, 0.1\]"):
        config_from_dict({"agent": "reinforce", "reinforce": {"alpha": [0.1, 0.1]}})


def test_an_option_outside_its_section_names_the_section_of_the_agent():
    with pytest.raises(ConfigError, match="'alpha' belongs in the 'continuation' section"):
        config_from_dict({"alpha": 0.1})  # the default agent's
    with pytest.raises(ConfigError, match="'alpha' belongs in the 'reinforce' section"):
        config_from_dict({"agent": "reinforce", "alpha": 0.1})
    # ``epochs`` is an option of both algorithms: the configured agent's section is meant
    with pytest.raises(ConfigError, match="'epochs' belongs in the 'reinforce' section"):
        config_from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="'epochs' belongs in the 'ltc' section"):
        config_from_dict({"agent": "ltc", "epochs": 3})


def test_a_section_of_the_other_algorithm_is_rejected():
    with pytest.raises(ConfigError, match="a 'reinforce' section but agent is 'ltc'"):
        config_from_dict({"agent": "ltc", "reinforce": {"alpha": [0.1]}})
    with pytest.raises(ConfigError, match="a 'ltc' section but agent is 'continuation'"):
        config_from_dict({"ltc": {"cost": 0.3}})
    with pytest.raises(ConfigError, match="a 'reinforce' section but agent is 'continuation'"):
        config_from_dict({"reinforce": {"baseline": "none"}})
    ltc = config_from_dict({"agent": "ltc", "ltc": {"cost": 0.3, "epochs": 2}})
    assert ltc.ltc == LtcConfig(cost=0.3, epochs=2) and ltc.reinforce == ReinforceConfig()
    assert set(ltc.to_dict()) & {"reinforce", "ltc"} == {"ltc"}  # only the agent's section


def test_a_flag_of_the_other_algorithm_is_rejected():
    parser = build_parser()
    with pytest.raises(ConfigError, match="--baseline applies to --agent reinforce only"):
        config_from_args(parser.parse_args(["--agent", "ltc", "--baseline", "none"]))
    with pytest.raises(ConfigError, match="--ltc-cost applies to --agent ltc only"):
        config_from_args(parser.parse_args(["--ltc-cost", "0.3"]))
    # the agent may come from the config file
    with pytest.raises(ConfigError, match="--alpha does not apply to --agent ltc"):
        config_from_args(parser.parse_args(["--config", "ltc-cifar100-2", "--alpha", "0.1"]))
    with pytest.raises(ConfigError, match="--baseline applies to --agent reinforce only"):
        config_from_args(parser.parse_args(["--baseline", "none"]))  # the default agent
    # --alpha goes to the section of whichever agent is chosen
    parsed = config_from_args(parser.parse_args(["--alpha", "0.02", "0.05"]))
    assert parsed.continuation.alpha == [0.02, 0.05] and parsed.reinforce.alpha == [1e-3]
    parsed = config_from_args(parser.parse_args(["--agent", "reinforce", "--alpha", "0.02"]))
    assert parsed.reinforce.alpha == [0.02] and parsed.continuation.alpha == [1e-3]
    config = config_from_args(parser.parse_args(["--agent", "ltc", "--ltc-epochs", "2"]))
    assert config.agent == "ltc" and config.ltc.epochs == 2


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    sections = ("reinforce", "ltc", "continuation")
    flags = [f"--{f.name}" for f in dataclasses.fields(TrainConfig) if f.name not in sections]
    flags += [f"--{f.name}" for f in dataclasses.fields(ReinforceConfig)]
    flags += [f"--ltc-{f.name}" for f in dataclasses.fields(LtcConfig)]
    flags += [f"--cv-{f.name}" for f in dataclasses.fields(ContinuationConfig) if f.name != "alpha"]
    for flag in flags:
        assert flag.replace("_", "-") in text, flag
    assert "REINFORCE options" in text and "Learning-to-Cascade options" in text
    assert "continuation-value learner options" in text
    for flag in ("--config", "--resume", "--device", "--logdir"):
        assert flag in text
    # each config option states its own default once; the CLI's None placeholder never shows
    assert "default: None" not in text
    assert "(default: digits)" in " ".join(text.split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--alpha", "-1"], "alpha must be finite and >= 0"),
        (["--config", "missing.yaml"], "neither a file nor a shipped config"),
        (["--alpha", "0.1", "0.1"], "alpha lists a value twice"),
        (["--agent", "ltc", "--baseline", "none"], "--baseline applies to --agent reinforce"),
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
    assert yaml.safe_load((run / "config.yaml").read_text())["reinforce"]["alpha"] == [0.01]
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
    assert main(["--alpha", "0.001", "0.1", "--logdir", str(tmp_path), *TINY]) == 0
    alphas = sorted(
        yaml.safe_load((run / "config.yaml").read_text())["reinforce"]["alpha"][0]
        for run in tmp_path.iterdir()
    )
    assert alphas == [0.001, 0.1]


def test_unique_run_dir_never_reuses_a_directory(tmp_path):
    first = unique_run_dir(tmp_path, "run")
    assert first == tmp_path / "run"
    first.mkdir()
    second = unique_run_dir(tmp_path, "run")
    assert second == tmp_path / "run-2"
    second.mkdir()
    assert unique_run_dir(tmp_path, "run") == tmp_path / "run-3"
    assert unique_run_dir(tmp_path / "new", "run") == tmp_path / "new" / "run"


def test_two_runs_with_the_same_name_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_shared_timestamp", lambda: "20260101-000000")
    argv = ["--alpha", "0.01", "--logdir", str(tmp_path), *TINY]
    assert main(argv) == 0 and main(argv) == 0
    name = "digits__reinforce__optimal-constant__a0.01__s0__20260101-000000"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, name + "-2"]
    for run in tmp_path.iterdir():
        assert (run / "metrics.json").is_file() and (run / "checkpoint.pt").is_file()


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "policycascade.train", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--alpha" in result.stdout


def test_policycascade_command_dispatches_to_each_subcommand(capsys):
    assert cli.main(["train", "--config", "cifar10-resnet", "--dry-run", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["cascade"] == "cifar-resnet" and len(table["stages"]) == 5
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in ("train", "compare", "bench", "bench-epoch"):
        assert f"  {command} " in listed
    assert cli.main([]) == 2  # no command: a usage error, with the usage on stderr
    assert "bench-epoch" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "Traceback" not in err
    assert cli.main(["train", "--alpha", "-1", "--dry-run"]) == 2  # the subcommand's status
    assert "alpha must be finite and >= 0" in capsys.readouterr().err


def test_python_m_policycascade_train_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "policycascade", "train", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--alpha" in result.stdout and "--ltc-cost" in result.stdout


def test_a_value_error_inside_training_is_a_bug_with_a_traceback_not_a_usage_error(
    tmp_path, monkeypatch
):
    def broken_step(self, idx, step=0):
        raise ValueError("shapes do not line up")

    monkeypatch.setattr(ReinforceTraining, "pretrain_step", broken_step)
    argv = ["--agent", "reinforce", "--pretrain-epochs", "1", "--epochs", "0", "--no-progress"]
    argv += ["--logdir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="training failed unexpectedly: shapes do not line up"):
        main(argv)
