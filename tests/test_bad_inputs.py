"""Bad inputs get one clear message that names the field and the value, never a traceback.

The CLI answers a usage error with exit status 2 and a single ``error: ...`` line on
stderr; the Python API raises ``ValueError`` (or gymnasium's own error for actions and
resets) with the field in the message. docs/bad-inputs.md lists every case tried here
with the message a user gets.
"""

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from gymnasium.error import InvalidAction, ResetNeeded
from torch import nn

import policycascade.supervised
from conftest import hand_outputs
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpoint import CHECKPOINT_NAME
from policycascade.config import ReinforceConfig, TrainConfig, _cli_options, config_from_dict
from policycascade.costs import StageCosts
from policycascade.envs import DIGITS_ID, STOP, CascadeStoppingEnv, CascadeStoppingVectorEnv
from policycascade.envs.registration import register_cascade
from policycascade.harness import RunHarness
from policycascade.train import main

# -- the command line -------------------------------------------------------------------------

BAD_INPUTS_DOC = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()

# Flags of the REINFORCE section (--alpha is every agent's): cases that use them choose that agent.
REINFORCE_FLAGS = {
    flag for section, f, flag in _cli_options() if section == "reinforce" and f.name != "alpha"
}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``python -m policycascade.train ARGV``, run in-process."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse reports its own errors this way
        status = exit_.code
    return status, capsys.readouterr().err


def assert_usage_error(status: int, err: str, *fragments: str) -> None:
    """Exit status 2 and exactly one line on stderr, naming the field and the value."""
    assert "Traceback" not in err, err
    assert status == 2, f"exit status {status}, stderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from {lines[0]!r}"


CLI_CASES = [
    # (YAML text for {config} or None, arguments, fragments of the one error line)
    pytest.param(
        "reinforce:\n  baselin: none\n",
        ["--config", "{config}"],
        ["unknown reinforce section key 'baselin'", "did you mean 'baseline'?"],
        id="yaml-unknown-key",
    ),
    pytest.param(
        "baselin: none\n",
        ["--config", "{config}"],
        ["unknown config key 'baselin'", "did you mean 'baseline' in the 'reinforce' section"],
        id="yaml-unknown-key-outside-section",
    ),
    pytest.param(
        "epochs: 10\n",
        ["--config", "{config}"],
        ["'epochs' belongs in the 'reinforce' section"],
        id="yaml-key-outside-section",
    ),
    pytest.param(
        "agent: ltc\nreinforce:\n  alpha: [0.1]\n",
        ["--config", "{config}"],
        ["'reinforce' section", "agent is 'ltc'"],
        id="yaml-section-of-other-agent",
    ),
    pytest.param(
        "reinforce:\n  epochs: ten\n",
        ["--config", "{config}"],
        ["epochs", "'ten'"],
        id="yaml-int-str",
    ),
    pytest.param(
        "reinforce:\n  epochs: 2.5\n",
        ["--config", "{config}"],
        ["epochs", "2.5"],
        id="yaml-int-float",
    ),
    pytest.param(
        "reinforce:\n  alpha: [0.1, abc]\n",
        ["--config", "{config}"],
        ["alpha", "'abc'"],
        id="yaml-alpha-str",
    ),
    pytest.param(
        "reinforce:\n  alpha:\n", ["--config", "{config}"], ["alpha", "None"], id="yaml-alpha-empty"
    ),
    pytest.param(
        "reinforce:\n  freeze_classifiers: 'yes'\n",
        ["--config", "{config}"],
        ["freeze_classifiers", "'yes'"],
        id="yaml-bool-str",
    ),
    pytest.param(
        "reinforce:\n  baseline: mean\n",
        ["--config", "{config}"],
        ["baseline", "'mean'"],
        id="yaml-bad-choice",
    ),
    pytest.param(
        "reinforce: [alpha]\n",
        ["--config", "{config}"],
        ["reinforce section", "mapping", "['alpha']"],
        id="yaml-section-not-a-mapping",
    ),
    pytest.param(
        "- alpha\n- 0.1\n",
        ["--config", "{config}"],
        ["bad.yaml", "mapping"],
        id="yaml-not-a-mapping",
    ),
    pytest.param(
        "reinforce:\n  epochs: [1,\n",
        ["--config", "{config}"],
        ["bad.yaml", "not valid YAML", "line"],
        id="yaml-invalid",
    ),
    pytest.param(
        None,
        ["--config", "missing.yaml"],
        ["'missing.yaml'", "neither a file nor a shipped config", "digits"],
        id="yaml-missing-file",
    ),
    pytest.param(None, ["--alpha", "-1"], ["alpha", "-1"], id="alpha-negative"),
    pytest.param(None, ["--alpha", "nan"], ["alpha", "nan"], id="alpha-nan"),
    pytest.param(None, ["--alpha", "inf"], ["alpha", "inf"], id="alpha-inf"),
    pytest.param(None, ["--alpha", "0.1", "-0.5"], ["alpha", "-0.5"], id="alpha-second-negative"),
    pytest.param(
        None, ["--alpha", "0.1", "0.1"], ["alpha", "twice", "[0.1, 0.1]"], id="alpha-duplicate"
    ),
    # epochs=0 is accepted (pre-training only), so the message must not say ">= 1".
    pytest.param(None, ["--epochs", "-3"], ["epochs must be >= 0", "-3"], id="epochs-negative"),
    pytest.param(
        None,
        ["--pretrain-epochs", "0", "--epochs", "0"],
        ["pretrain_epochs", "epochs", "0"],
        id="nothing-to-train",
    ),
    pytest.param(
        None, ["--pretrain-epochs", "-1"], ["pretrain_epochs", "-1"], id="pretrain-negative"
    ),
    pytest.param(None, ["--batch-size", "0"], ["batch_size", "0"], id="batch-size-0"),
    pytest.param(None, ["--rollouts", "0"], ["rollouts", "0"], id="rollouts-0"),
    pytest.param(None, ["--policy-lr", "0"], ["policy_lr", "0"], id="policy-lr-0"),
    pytest.param(None, ["--lr", "nan"], ["lr", "nan"], id="lr-nan"),
    pytest.param(
        None,
        ["--baseline", "leave-one-out", "--rollouts", "1"],
        ["leave-one-out", "rollouts", "1"],
        id="leave-one-out-1-rollout",
    ),
    pytest.param(None, ["--device", "banana"], ["device", "'banana'"], id="device-unknown"),
    pytest.param(None, ["--seed", "-1"], ["seed", "-1"], id="seed-negative"),
    # an option of the other algorithm would be ignored: it is an error instead
    pytest.param(
        None,
        ["--agent", "ltc", "--baseline", "none"],
        ["--baseline", "--agent reinforce only", "'ltc'"],
        id="reinforce-option-with-ltc",
    ),
    pytest.param(
        None,
        ["--ltc-cost", "0.3", "--ltc-epochs", "2"],
        ["--ltc-cost", "--ltc-epochs", "--agent ltc only", "'continuation'"],
        id="ltc-options-with-the-default-agent",
    ),
    pytest.param(
        None,
        ["--config", "cifar10-resnet", "--agent", "ltc"],
        ["--agent ltc", "'cifar10-resnet'", "'reinforce' section", "ignored"],
        id="agent-other-than-the-config-files",
    ),
    pytest.param(
        None,
        ["--agent", "ltc", "--ltc-epsilon", "1"],
        ["epsilon", "[0, 1)", "1.0"],
        id="ltc-epsilon-1",
    ),
    pytest.param(
        None,
        ["--agent", "ltc", "--ltc-epochs", "0"],
        ["ltc.epochs", ">= 1", "0"],
        id="ltc-epochs-0",
    ),
    # issue 19, cause 4: an option the chosen agent or path does not read is refused, never
    # recorded in config.yaml and ignored
    # every agent's classifiers honour the shared training options (one training loop), so a
    # schedule must end inside the continuation learner's classifier epochs
    pytest.param(
        None,
        ["--lr-milestones", "40"],
        ["lr_milestones [40]", "continuation.classifier_epochs = 40"],
        id="cv-milestones",
    ),
    pytest.param(None, ["--compile", "on"], ["--compile on", "'reinforce' only"], id="cv-compile"),
    pytest.param(
        "agent: continuation\ncompile: 'on'\n",
        ["--config", "{config}"],
        ["compile='on' would be ignored", "'continuation'"],
        id="yaml-cv-compile",
    ),
    pytest.param(
        None, ["--lr-gamma", "0.5", "--epochs", "3"], ["--lr-gamma 0.5", "none"], id="lr-gamma"
    ),
    pytest.param(
        None, ["--download"], ["--download", "'digits' is built in"], id="download-digits"
    ),
    pytest.param(
        None,
        ["--env", "mymodule:policycascade/Mine-v0", "--dataset", "cifar10"],
        ["--dataset cifar10", "env 'mymodule:policycascade/Mine-v0'"],
        id="env-dataset",
    ),
    pytest.param(
        None,
        ["--env", "mymodule:policycascade/Mine-v0", "--cv-folds", "3"],
        ["--cv-folds 3", "trains no classifier"],
        id="env-folds",
    ),
    pytest.param(
        None,
        ["--epochs", "0", "--baseline", "none"],
        ["--baseline none", "epochs 0"],
        id="reinforce-pretrain-only-baseline",
    ),
    pytest.param(
        None,
        ["--freeze-classifiers", "--joint-lr-scale", "0.5"],
        ["--joint-lr-scale 0.5", "freeze_classifiers"],
        id="frozen-joint-lr",
    ),
    pytest.param(
        None,
        ["--agent", "ltc", "--ltc-form", "multi-exit", "--cascade", "specialist"],
        ["--cascade specialist", "multi-exit"],
        id="ltc-multi-exit-cascade",
    ),
    pytest.param(None, ["--json"], ["--json", "--dry-run"], id="json-without-dry-run"),
    # issue 19, cause 9: no value dropped: an option given twice, a value listed twice
    pytest.param(
        None,
        ["--alpha", "1e-3", "--alpha", "1e-2"],
        ["--alpha 0.001 and --alpha 0.01", "given twice"],
        id="alpha-given-twice",
    ),
    pytest.param(
        None, ["--augment", "--no-augment"], ["--augment and --no-augment"], id="flag-and-negation"
    ),
    pytest.param(None, ["--seed", "1", "--seed", "2"], ["--seed", "twice"], id="seed-twice"),
    pytest.param(
        None,
        ["--agent", "reinforce", "--lr-milestones", "5", "5"],
        ["lr_milestones", "twice", "[5, 5]"],
        id="milestone-twice",
    ),
    pytest.param(
        "agent: reinforce\nlr_milestones: [5, 5]\n",
        ["--config", "{config}"],
        ["lr_milestones", "twice", "[5, 5]"],
        id="yaml-milestone-twice",
    ),
    pytest.param(
        "agent: continuation\ncontinuation:\n  alpha: [0.01, 0.01]\n",
        ["--config", "{config}"],
        ["alpha", "twice", "[0.01, 0.01]"],
        id="yaml-alpha-twice",
    ),
    pytest.param(
        None,
        ["--pretrain-epochs", "2", "--epochs", "1", "--lr-milestones", "3"],
        ["lr_milestones [3]", "= 3"],
        id="milestone-never-reached",
    ),
    pytest.param(None, ["--threads", "-1"], ["threads", "-1"], id="threads-negative"),
    # argparse's own errors: one line too, not the 28-line usage block.
    pytest.param(None, ["--baseline", "mean"], ["--baseline", "'mean'"], id="baseline-choice"),
    pytest.param(None, ["--agent", "ppo"], ["--agent", "'ppo'"], id="agent-choice"),
    pytest.param(None, ["--loss", "hinge"], ["--loss", "'hinge'"], id="loss-choice"),
    pytest.param(None, ["--epochs", "ten"], ["--epochs", "'ten'"], id="epochs-not-int"),
    pytest.param(None, ["--alpha"], ["--alpha"], id="alpha-without-value"),
    pytest.param(None, ["--lambda", "0.1"], ["--lambda"], id="unknown-option"),
]


@pytest.mark.parametrize("yaml_text, argv, fragments", CLI_CASES)
def test_cli_usage_error_is_one_line_naming_field_and_value(
    yaml_text, argv, fragments, tmp_path, capsys
):
    config = tmp_path / "bad.yaml"
    if yaml_text is not None:
        if yaml_text.startswith("reinforce:"):  # a REINFORCE section needs that agent
            yaml_text = "agent: reinforce\n" + yaml_text
        config.write_text(yaml_text)
    argv = [arg.replace("{config}", str(config)) for arg in argv]
    if "--agent" not in argv and any(arg in REINFORCE_FLAGS for arg in argv):
        argv = ["--agent", "reinforce", *argv]
    logdir = tmp_path / "runs"
    status, err = run_cli([*argv, "--logdir", str(logdir), "--no-progress"], capsys)
    assert_usage_error(status, err, *fragments)
    assert not logdir.exists()  # nothing was started
    # docs/bad-inputs.md quotes this message exactly (paths as the doc writes them)
    message = err.strip().replace(str(config), "bad.yaml").replace(str(tmp_path) + "/", "")
    assert message in BAD_INPUTS_DOC, f"docs/bad-inputs.md does not quote: {message}"


def test_cli_device_cuda_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logdir = tmp_path / "runs"
    status, err = run_cli(["--device", "cuda", "--logdir", str(logdir), "--no-progress"], capsys)
    assert_usage_error(status, err, "device", "'cuda'", "CUDA is not available")
    assert not logdir.exists()


def test_cli_logdir_that_is_a_file(tmp_path, capsys):
    logdir = tmp_path / "not-a-directory"
    logdir.write_text("")
    status, err = run_cli(["--logdir", str(logdir), "--no-progress"], capsys)
    assert_usage_error(status, err, "logdir", str(logdir))


FINISHED = TrainConfig(
    device="cpu",
    agent="reinforce",
    reinforce=ReinforceConfig(pretrain_epochs=1, epochs=1, alpha=[0.01]),
)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """A real checkpoint of a run that has finished its (1 + 1) epochs, without training it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_dir.mkdir()
    harness = RunHarness(FINISHED, run_dir, 0.01, show_progress=False)
    harness.epoch = harness.algorithm.num_epochs
    harness.save()
    return (run_dir / CHECKPOINT_NAME).read_bytes()


def _missing(tmp_path, data):
    return [str(tmp_path / "no" / "such" / "run")]


def _empty_dir(tmp_path, data):
    return [str(tmp_path)]


def _garbage(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint" * 100)
    return [str(tmp_path)]


def _empty_file(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    return [str(tmp_path)]


def _truncated(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    return [str(tmp_path)]


def _foreign(tmp_path, data):
    torch.save({"model": torch.zeros(3)}, tmp_path / CHECKPOINT_NAME)
    return [str(tmp_path)]


def _file_not_dir(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(data)
    return [str(tmp_path / CHECKPOINT_NAME)]


def _with_options(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(data)
    return [str(tmp_path), "--epochs", "5"]  # the checkpoint's config would silently win


def _edited_config(tmp_path, data):
    (tmp_path / CHECKPOINT_NAME).write_bytes(data)
    edited = dataclasses.replace(FINISHED, seed=7)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(edited.to_dict(), sort_keys=False))
    return [str(tmp_path)]


RESUME_CASES = [  # "{path}" stands for the path given to --resume
    pytest.param(_missing, ["no checkpoint", "{path}"], id="resume-missing-dir"),
    pytest.param(_empty_dir, ["no checkpoint", "{path}"], id="resume-dir-no-checkpoint"),
    pytest.param(_garbage, ["checkpoint", "{path}"], id="resume-garbage-file"),
    pytest.param(_empty_file, ["checkpoint", "{path}"], id="resume-empty-file"),
    pytest.param(_truncated, ["checkpoint", "{path}"], id="resume-truncated-file"),
    pytest.param(_foreign, ["checkpoint", "{path}"], id="resume-foreign-checkpoint"),
    pytest.param(_file_not_dir, ["--resume", "{path}"], id="resume-checkpoint-file"),
    pytest.param(_with_options, ["--resume", "--epochs"], id="resume-with-other-options"),
    pytest.param(
        _edited_config,
        ["config.yaml", "disagree", "seed: 7 in config.yaml, 0 in the checkpoint"],
        id="resume-config-yaml-edited",
    ),
]


@pytest.mark.parametrize("make, fragments", RESUME_CASES)
def test_cli_bad_resume_is_a_usage_error(make, fragments, checkpoint_bytes, tmp_path, capsys):
    target = tmp_path / "run"
    target.mkdir()
    argv = make(target, checkpoint_bytes)
    status, err = run_cli(["--resume", *argv, "--no-progress"], capsys)
    assert_usage_error(status, err, *(f.replace("{path}", argv[0]) for f in fragments))
    assert not (target / "metrics.json").exists()


# -- the Python API ---------------------------------------------------------------------------


def _linear_cascade(out_features=(3, 3), num_classes=3) -> Cascade:
    return Cascade([nn.Linear(4, c) for c in out_features], (4,), num_classes, ["a", "b"])


def _env() -> CascadeStoppingEnv:
    env = CascadeStoppingEnv(hand_outputs())
    env.reset(seed=0)
    return env


def _ended_env() -> CascadeStoppingEnv:
    env = _env()
    env.step(STOP)
    return env


def _vec() -> CascadeStoppingVectorEnv:
    vec = CascadeStoppingVectorEnv(4, hand_outputs(), device="cpu")
    vec.reset(seed=0)
    return vec


_X, _Y = torch.randn(10, 4), torch.arange(10) % 3


def _register(name="BadInputs", classifiers=None, x=_X, y=_Y, **kwargs):
    classifiers = classifiers or [nn.Linear(4, 3), nn.Linear(4, 3)]
    return register_cascade(name, classifiers, x, y, **kwargs)


API_CASES = [
    # (call, expected exception, fragments of its message)
    # issue 19, cause 10: configs built in Python name the field, never "'float' object is not
    # iterable" (ConfigTypeError is both a TypeError and a ValueError)
    pytest.param(
        lambda: TrainConfig(reinforce=ReinforceConfig(alpha=0.01)).validate(),
        TypeError,
        ["alpha", "list of numbers", "0.01"],
        id="config-alpha-scalar",
    ),
    pytest.param(
        lambda: TrainConfig(seed=1.5).validate(), TypeError, ["seed", "1.5"], id="config-seed-float"
    ),
    pytest.param(
        lambda: TrainConfig(reinforce={"alpha": [0.1]}).validate(),
        TypeError,
        ["reinforce", "ReinforceConfig", "{'alpha': [0.1]}"],
        id="config-section-dict",
    ),
    pytest.param(
        lambda: config_from_dict({"continuation": {"alpha": [0.1, "x"]}}),
        ValueError,
        ["alpha", "'x'"],
        id="config-from-dict-alpha-str",
    ),
    pytest.param(
        lambda: config_from_dict({}, base="digits"),
        TypeError,
        ["base", "'digits'"],
        id="config-from-dict-base",
    ),
    pytest.param(
        lambda: config_from_dict({"compile": "on"}),
        ValueError,
        ["compile='on'", "'continuation'"],
        id="config-from-dict-unread",
    ),
    pytest.param(
        lambda: Cascade([nn.Linear(4, 3)], (4,), 3), ValueError, ["K=1"], id="cascade-one-stage"
    ),
    pytest.param(
        lambda: _linear_cascade((1, 1), num_classes=1),
        ValueError,
        ["num_classes", "1"],
        id="cascade-one-class",
    ),
    pytest.param(
        lambda: _linear_cascade((3, 5)).costs(),
        ValueError,
        ["'b'", "(batch, 3)", "(1, 5)"],
        id="cascade-output-size-costs",
    ),
    pytest.param(
        lambda: _linear_cascade((3, 5))(torch.zeros(2, 4)),
        ValueError,
        ["'b'", "(batch, 3)"],
        id="cascade-output-size-forward",
    ),
    pytest.param(lambda: StageCosts([10]), ValueError, ["K=1"], id="costs-one-stage"),
    pytest.param(lambda: StageCosts([0, 10]), ValueError, ["MACs", "[0, 10]"], id="costs-zero"),
    pytest.param(
        lambda: StageCosts([-5, 10]), ValueError, ["MACs", "[-5, 10]"], id="costs-negative"
    ),
    pytest.param(
        lambda: StageCosts([float("nan"), 10]), ValueError, ["MACs", "nan"], id="costs-nan"
    ),
    pytest.param(
        lambda: StageCosts([float("inf"), 10]), ValueError, ["MACs", "inf"], id="costs-inf"
    ),
    pytest.param(
        lambda: StageCosts([10, 20], [-1, 0]),
        ValueError,
        ["policy_macs", "[-1, 0]"],
        id="policy-macs-negative",
    ),
    pytest.param(
        lambda: StageCosts([10, 20], [1]),
        ValueError,
        ["policy_macs", "2", "1"],
        id="policy-macs-length",
    ),
    pytest.param(
        lambda: CascadeOutputs(hand_outputs().probs, torch.tensor([1, 7]), hand_outputs().costs),
        ValueError,
        ["labels", "7"],
        id="outputs-label-out-of-range",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), alpha=-1),
        ValueError,
        ["alpha", "-1"],
        id="env-alpha-negative",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), alpha=float("nan")),
        ValueError,
        ["alpha", "nan"],
        id="env-alpha-nan",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), alpha=float("inf")),
        ValueError,
        ["alpha", "inf"],
        id="env-alpha-inf",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), alpha="abc"),
        ValueError,
        ["alpha", "'abc'"],
        id="env-alpha-str",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), alpha=None),
        ValueError,
        ["alpha", "None"],
        id="env-alpha-none",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), loss="hinge"),
        ValueError,
        ["loss", "'hinge'"],
        id="env-loss",
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs(), render_mode="human"),
        ValueError,
        ["render_mode", "'human'"],
        id="env-render-mode",
    ),
    *(
        pytest.param(
            lambda a=action: _env().step(a), InvalidAction, ["action", repr(action)], id=f"step-{i}"
        )
        for i, action in enumerate([2, -1, 0.5, "stop", np.array([1]), None])
    ),
    pytest.param(
        lambda: CascadeStoppingEnv(hand_outputs()).step(STOP),
        ResetNeeded,
        ["no episode has started", "reset()"],
        id="step-before-reset",
    ),
    pytest.param(
        lambda: _ended_env().step(STOP), ResetNeeded, ["has ended", "reset()"], id="step-after-end"
    ),
    pytest.param(
        lambda: _env().reset(options={"sample_index": 5}),
        ValueError,
        ["sample_index", "5"],
        id="reset-index-out-of-range",
    ),
    pytest.param(
        lambda: _env().reset(options={"sample_index": "abc"}),
        ValueError,
        ["sample_index", "'abc'"],
        id="reset-index-str",
    ),
    pytest.param(
        lambda: CascadeStoppingVectorEnv(0, hand_outputs(), device="cpu"),
        ValueError,
        ["num_envs", "0"],
        id="vec-num-envs-0",
    ),
    pytest.param(
        lambda: _vec().step(torch.zeros(3, dtype=torch.int64)),
        ValueError,
        ["actions", "(4,)", "(3,)"],
        id="vec-actions-short",
    ),
    pytest.param(
        lambda: _vec().step(torch.zeros(4, 1, dtype=torch.int64)),
        ValueError,
        ["actions", "(4,)", "(4, 1)"],
        id="vec-actions-column",
    ),
    pytest.param(
        lambda: _vec().step(torch.tensor(1)), ValueError, ["actions", "()"], id="vec-actions-scalar"
    ),
    pytest.param(
        lambda: _vec().step([0, 1, 2, 0]),
        ValueError,
        ["actions", "0 (continue) or 1 (stop)"],
        id="vec-actions-value-2",
    ),
    pytest.param(
        lambda: _vec().step([0, -1, 0, 0]),
        ValueError,
        ["actions", "0 (continue) or 1 (stop)"],
        id="vec-actions-neg",
    ),
    pytest.param(
        lambda: _vec().step([0.5] * 4),
        ValueError,
        ["actions", "0 (continue) or 1 (stop)"],
        id="vec-actions-fraction",
    ),
    pytest.param(
        lambda: _vec().step(["stop"] * 4), ValueError, ["actions", "'stop'"], id="vec-actions-str"
    ),
    pytest.param(lambda: _vec().step(None), ValueError, ["actions", "None"], id="vec-actions-none"),
    pytest.param(
        lambda: _register(y=_Y[:5]), ValueError, ["x and y", "10", "5"], id="register-x-y-lengths"
    ),
    *(
        pytest.param(
            lambda n=name: _register(name=n), ValueError, ["name", repr(name)], id=f"register-{i}"
        )
        for i, name in enumerate(["", "a/b", "Thing-v1", 123])
    ),
    pytest.param(
        lambda: _register(name="My Cascade"),
        ValueError,
        ["name", "'My Cascade'"],
        id="register-name-with-space",
    ),
    pytest.param(
        lambda: _register(classifiers=[nn.Linear(4, 3)]),
        ValueError,
        ["K=1"],
        id="register-one-classifier",
    ),
    pytest.param(
        lambda: _register(classifiers=[nn.Linear(4, 3), nn.Linear(4, 5)]),
        ValueError,
        ["'stage1'", "(batch, 3)"],
        id="register-output-size",
    ),
    pytest.param(
        lambda: _register(
            name="BadInputsLabels", classifiers=[nn.Linear(4, 2), nn.Linear(4, 2)], num_classes=2
        ),
        ValueError,
        ["num_classes", "2"],
        id="register-labels-beyond-num-classes",
    ),
]


@pytest.mark.parametrize("call, error, fragments", API_CASES)
def test_api_rejects_bad_input_naming_the_field(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from {raised.value!r}"
    message = str(raised.value).splitlines()[0]
    assert message in BAD_INPUTS_DOC, f"docs/bad-inputs.md does not quote: {message}"


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"alpha": -1.0}, ["alpha", "-1"]),
        ({"loss": "hinge"}, ["loss", "'hinge'"]),
        ({"split": "tset"}, ["split", "'tset'"]),
    ],
    ids=["alpha", "loss", "split"],
)
def test_digits_env_rejects_bad_arguments_before_training(kwargs, fragments, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("pre-trained the classifiers before checking the arguments")

    monkeypatch.setattr(policycascade.supervised, "fit_classifiers", no_training)
    for make in (gym.make, lambda env_id, **kw: gym.make_vec(env_id, num_envs=2, **kw)):
        with pytest.raises(ValueError) as raised:
            make(DIGITS_ID, seed=12345, **kwargs)
        for fragment in fragments:
            assert fragment in str(raised.value)


def test_make_vec_rejects_a_misspelled_argument_by_name():
    with pytest.raises(TypeError, match="alhpa"):
        gym.make_vec(DIGITS_ID, num_envs=2, alhpa=0.1)


def test_digits_env_rejects_a_checkpoint_of_another_cascade(
    checkpoint_bytes, tmp_path, monkeypatch
):
    def no_training(*args, **kw):
        raise AssertionError("trained instead of loading the checkpoint")

    monkeypatch.setattr(policycascade.supervised, "fit_classifiers", no_training)
    # A run's checkpoint is accepted as it is (the env reads the harness's format) ...
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(checkpoint_bytes)
    gym.make(DIGITS_ID, checkpoint=str(path), seed=998).close()
    # ... and the same checkpoint holding another cascade's weights is not.
    state = torch.load(path, weights_only=False)
    other = Cascade([nn.Linear(64, 10), nn.Linear(64, 10)], (64,), 10, ["a", "b"])
    state["state"]["cascade"] = other.state_dict()
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not hold the digits cascade") as raised:
        gym.make(DIGITS_ID, checkpoint=str(path), seed=999)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
