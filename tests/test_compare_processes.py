"""compare over several runs in forked processes gives the one-process comparison, byte for byte."""

from __future__ import annotations

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policycascade.compare.api import compare_runs
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


def _compare(runs, out, processes: int) -> tuple[bytes, bytes, list[str], list[str]]:
    """comparison.json and .csv, the PNG names and the TensorBoard image tags."""
    args = [str(runs), "--out", str(out), "--sweep-points", "4", "--criteria", "max-softmax"]
    args += ["--no-reference"]  # (the reference trains in the helpers the same way)
    args += ["--processes", str(processes)]
    assert compare_main(args) == 0
    (tensorboard,) = out.glob("tensorboard*")
    summary = EventAccumulator(str(tensorboard / "summary"))
    summary.Reload()
    for tag in summary.Tags()["images"]:  # the saved PNG, as it is
        (image,) = summary.Images(tag)
        name = tag.split("/", 1)[-1].replace("/", "__") + ".png"
        assert image.encoded_image_string == (out / name).read_bytes()
    return (
        (out / "comparison.json").read_bytes(),
        (out / "comparison.csv").read_bytes(),
        sorted(p.name for p in out.glob("*.png")),
        sorted(summary.Tags()["images"]),
    )


def test_processes_do_not_change_the_comparison(three_seeds, tmp_path):
    """Runs compared in helpers and figures drawn in one: the same files."""
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    alone = _compare(three_seeds, tmp_path / "one", 1)
    assert plt.get_fignums() == open_before  # the figures drawn here were closed
    assert alone[2] == ["accuracy_by_exit.png", "tradeoff.png"]
    assert alone[3] == ["compare/accuracy_by_exit", "compare/tradeoff"]
    assert _compare(three_seeds, tmp_path / "three", 3) == alone


def test_a_figure_drawn_in_a_helper_fails_as_in_one_process(three_seeds, tmp_path):
    """A figure that may not be replaced: the same error, and the file is kept."""
    comparison = compare_runs([three_seeds], reference=False, processes=1)
    errors = []
    for processes in (1, 2):
        out = tmp_path / f"o{processes}"
        out.mkdir()
        (out / "tradeoff.png").write_text("mine")
        with pytest.raises(ValueError) as error:
            comparison.write(out, processes=processes)
        errors.append(str(error.value).replace(str(out), "OUT"))
        assert (out / "tradeoff.png").read_text() == "mine"
    assert errors[0] == errors[1] and "tradeoff.png already exists" in errors[0]


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


def test_processes_asking_for_one_reference_train_it_once(three_seeds, tmp_path, monkeypatch):
    """Two processes at once (compare's helpers): the second reads what the first trained."""
    import multiprocessing
    import os
    import time

    import torch

    from policycascade.compare import reference
    from policycascade.runs import load_run

    run_dir = sorted(three_seeds.iterdir())[0]
    trained = tmp_path / "trained.txt"
    train = reference.train_reference

    def counted(*args, **kwargs):
        with open(trained, "a") as handle:
            handle.write("x")
        time.sleep(0.5)  # both processes are asking by now
        return train(*args, **kwargs)

    monkeypatch.setattr(reference, "train_reference", counted)
    cache = tmp_path / "cache"

    def ask() -> None:
        val, test, _ = reference.reference_outputs(load_run(run_dir), cache)
        torch.save((val.probs, test.probs), tmp_path / f"got-{os.getpid()}.pt")

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=ask) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    assert trained.read_text() == "x"  # trained once
    first, second = (torch.load(p) for p in sorted(tmp_path.glob("got-*.pt")))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("*.pt")).name]  # no lock left
