"""Output locations are checked before any work, and a resume cleans up after a killed write."""

import os

import pytest

from policycascade.train import main

TINY = ["--agent", "reinforce", "--pretrain-epochs", "1", "--epochs", "0", "--no-progress"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_logdir_below_a_regular_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "precious.txt").write_text("keep me")
    monkeypatch.setattr("policycascade.harness.load_dataset", _never)  # checked before data
    assert main(["--logdir", str(tmp_path / "precious.txt" / "sub"), *TINY]) == 2
    assert "is not a directory" in _one_line_error(capsys)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_logdir_on_a_read_only_file_system_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr("policycascade.harness.load_dataset", _never)
    assert main(["--logdir", "/sys/policycascade-test/runs", *TINY]) == 2
    assert "cannot be written" in _one_line_error(capsys)


def test_an_unwritable_logdir_is_refused_before_training(tmp_path, capsys, monkeypatch):
    # Root may write anywhere, so the permission itself is simulated (the test runs as root
    # in CI; an unprivileged user cannot reach this interpreter under /root).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr("policycascade.harness.load_dataset", _never)
    assert main(["--logdir", str(tmp_path / "runs"), *TINY]) == 2
    assert "read-only or permission is denied" in _one_line_error(capsys)


def test_resume_removes_a_temporary_checkpoint_left_by_a_kill(tmp_path, capsys):
    assert main(["--logdir", str(tmp_path), *TINY]) == 0
    (run,) = tmp_path.iterdir()
    stale = run / ".checkpoint.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert not stale.exists()


def _never(*args, **kwargs):
    pytest.fail("the data set was loaded before the output location was checked")
