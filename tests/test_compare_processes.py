"""compare over several runs in forked processes gives the one-process comparison, byte for byte."""

from __future__ import annotations

import shutil

import pytest

from policycascade.compare.cli import main as compare_main
from policycascade.train import main as train_main

FAST = ["--agent", "ltc", "--ltc-epochs", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    """Three finished LtC runs of one configuration, seeds 0-2."""
    root = tmp_path_factory.mktemp("seeds")
    for seed in range(3):
        assert train_main([*FAST, "--seed", str(seed), "--logdir", str(root / "runs")]) == 0
    return root / "runs"


def _compare(runs, out, processes: int) -> bytes:
    args = [str(runs), "--out", str(out), "--sweep-points", "4", "--criteria", "max-softmax"]
    args += ["--no-reference"]  # (the reference trains in the helpers the same way)
    args += ["--processes", str(processes)]
    assert compare_main(args) == 0
    return (out / "comparison.json").read_bytes()


def test_processes_do_not_change_the_comparison(three_seeds, tmp_path):
    alone = _compare(three_seeds, tmp_path / "one", 1)
    assert _compare(three_seeds, tmp_path / "three", 3) == alone


def test_a_user_error_in_a_helper_reads_as_in_one_process(three_seeds, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(three_seeds, twin / "a")
    first = sorted((twin / "a").iterdir())[0]
    shutil.copytree(first, twin / "b" / first.name)  # the same run twice
    messages = []
    for processes in (1, 3):
        capsys.readouterr()
        args = [
            str(twin / "a"),
            str(twin / "b"),
            "--out",
            str(tmp_path / f"o{processes}"),
            "--no-reference",
        ]
        assert compare_main([*args, "--processes", str(processes)]) == 2
        messages.append(capsys.readouterr().err)
    assert messages[0] == messages[1] and "same configuration and seed 0" in messages[0]
    assert compare_main([str(three_seeds), "--processes", "-1", "--out", str(tmp_path)]) == 2
    assert "processes must be an integer >= 0, got -1" in capsys.readouterr().err
