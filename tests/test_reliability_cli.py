"""Issue 19 on the command line: options used or refused, one line before any work, no value lost.

Cases that need a working directory, a module on disk or a network failure live here;
the plain one-line cases are in ``tests/test_bad_inputs.py`` (``CLI_CASES``). Every message
is quoted in docs/bad-inputs.md, which these tests check too.
"""

import sys
from pathlib import Path

import pytest

from policycascade.cli_support import import_user_module
from policycascade.config import (
    ENV_UNREAD,
    TrainConfig,
    _cli_options,
    config_from_dict,
    option_value,
    unread_options,
)
from policycascade.train import main

DOC = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()

MODULE = """
import torch
from torch import nn
import policycascade

torch.manual_seed(0)
x, y = torch.randn(40, 4), torch.arange(40) % 3
nets = [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))]
splits = {"fit": (x, y), "val": (x[:20], y[:20]), "test": (x[20:], y[20:])}
policycascade.register_cascade("{name}", [n.eval() for n in nets], splits=splits)
"""


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``policycascade train ARGV``, in-process."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line(status: int, err: str, *fragments: str) -> str:
    """Status 2 and one ``error:`` line holding every fragment; returns the line."""
    assert "Traceback" not in err, err
    assert status == 2, f"status {status}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from {lines[0]!r}"
    return lines[0]


@pytest.fixture
def console_script_path(monkeypatch, tmp_path):
    """The working directory is tmp_path and not on sys.path, as under the console script."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path


def test_env_module_in_the_working_directory_imports_like_python_m(console_script_path, capsys):
    (console_script_path / "mycascade_e2.py").write_text(MODULE.replace("{name}", "CwdE2"))
    env = "mycascade_e2:policycascade/CwdE2-v0"
    status, out, err = run_cli(
        ["--env", env, "--alpha", "0.01", "--logdir", "runs", "--no-progress"], capsys
    )
    assert status == 0, err
    assert "learned policy" in out and out.startswith("threads: ")
    assert str(console_script_path) not in sys.path  # the path is restored after the import
    (run_dir,) = (console_script_path / "runs").iterdir()
    assert run_dir.name.startswith("CwdE2-v0__continuation")


def test_misspelled_env_module_is_one_line_before_anything_is_created(console_script_path, capsys):
    status, _, err = run_cli(
        ["--env", "mycascdae:policycascade/Mine-v0", "--logdir", "runs"], capsys
    )
    line = assert_one_line(status, err, "no module named 'mycascdae'", str(console_script_path))
    assert not (console_script_path / "runs").exists()
    assert line.replace(str(console_script_path), "DIR") in DOC


def test_module_whose_own_import_fails_names_the_missing_module(console_script_path, capsys):
    (console_script_path / "broken_e2.py").write_text("import no_such_dependency_e2\n")
    status, _, err = run_cli(["--env", "broken_e2:policycascade/Mine-v0"], capsys)
    line = assert_one_line(status, err, "importing 'broken_e2' failed", "no_such_dependency_e2")
    assert line in DOC


def test_unregistered_env_id_is_one_line(console_script_path, capsys):
    status, _, err = run_cli(["--env", "policycascade/NotThere-v0", "--logdir", "runs"], capsys)
    line = assert_one_line(status, err, "'policycascade/NotThere-v0' was not registered")
    assert not (console_script_path / "runs").exists()
    assert line.split(" (registered:")[0] in DOC


def test_import_user_module_restores_sys_path_and_names_what(console_script_path):
    before = list(sys.path)
    (console_script_path / "plain_e2.py").write_text("VALUE = 3\n")
    assert import_user_module("plain_e2", "env 'x'").VALUE == 3
    assert sys.path == before
    with pytest.raises(ValueError, match="^env 'x': no module named 'plain_e3'"):
        import_user_module("plain_e3", "env 'x'")
    assert sys.path == before


def test_download_without_network_is_one_line_and_creates_no_run(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    logdir = tmp_path / "runs"
    argv = ["--config", "cifar10-resnet", "--download", "--data-dir", str(tmp_path / "data")]
    status, _, err = run_cli([*argv, "--logdir", str(logdir), "--no-progress"], capsys)
    line = assert_one_line(status, err, "downloading CIFAR-10", "Network is unreachable")
    assert not logdir.exists()
    assert line.replace(str(tmp_path) + "/", "") in DOC


def test_missing_data_is_refused_before_the_first_run_directory(tmp_path, capsys):
    logdir = tmp_path / "runs"
    argv = ["--config", "cifar10-resnet", "--data-dir", str(tmp_path / "data")]
    status, _, err = run_cli([*argv, "--logdir", str(logdir), "--no-progress"], capsys)
    assert_one_line(status, err, "CIFAR-10 not found", "--download")
    assert not logdir.exists()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--dry-run", "--alpha", "0.1"], ["--alpha would be ignored", "--dry-run"]),
        (["--dry-run", "--env", "m:policycascade/Mine-v0"], ["env 'm:policycascade/Mine-v0'"]),
    ],
    ids=["dry-run-alpha", "dry-run-env"],
)
def test_dry_run_refuses_what_it_would_ignore(argv, fragments, capsys):
    status, out, err = run_cli(argv, capsys)
    line = assert_one_line(status, err, *fragments)
    assert out == "" and line in DOC


def test_dry_run_accepts_what_it_reads(capsys):
    status, out, _ = run_cli(["--dry-run", "--cascade", "specialist", "--json"], capsys)
    assert status == 0 and '"cascade": "specialist"' in out


def test_every_flag_that_would_be_ignored_is_refused_whatever_its_value(capsys):
    """Each unread option of an --env run, given as a flag."""
    env = ["--env", "m:policycascade/Mine-v0"]
    cases = [(env, key) for key in ENV_UNREAD]
    flags = {
        (f.name if section is None else f"{section}.{f.name}"): (flag, f)
        for section, f, flag in _cli_options()
    }
    default = TrainConfig()
    for prefix, key in cases:
        flag, f = flags[key]
        value = option_value(default, key)  # the default itself: still not read
        if isinstance(value, bool):
            given = [flag]
        elif isinstance(value, list):
            given = [flag, "1"]
        else:
            given = [flag, str(value)]
        status, _, err = run_cli([*prefix, *given, "--logdir", "unused"], capsys)
        assert_one_line(status, err, flag.split()[0], "would be ignored")


def test_shipped_configs_set_only_what_their_agent_reads():
    """Every shipped config loads: none sets an option its agent would ignore."""
    from policycascade.config import load_config_file, shipped_configs

    for name in shipped_configs():
        config = config_from_dict(load_config_file(name))
        unread = unread_options(config)
        assert all(option_value(config, k) == option_value(TrainConfig(), k) for k in unread)


def test_yaml_list_of_milestones_and_scalar_alpha_are_handled_without_loss():
    config = config_from_dict({"agent": "reinforce", "reinforce": {"alpha": 0.01}})
    assert config.reinforce.alpha == [0.01]  # a scalar is a one-value list, not dropped
    with pytest.raises(ValueError, match="lr_milestones lists an epoch twice"):
        config_from_dict({"agent": "reinforce", "lr_milestones": [3, 3]})


def test_repeated_option_in_another_command_using_the_parser(capsys):
    from policycascade.bench import main as bench_main

    with pytest.raises(SystemExit) as raised:
        bench_main(["--threads", "1", "--threads", "2"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "--threads 1 and --threads 2" in err
