"""Bad inputs on compare's writer, the reference cache, evaluate_rule, ScoreSearch, label noise.

One case per failure found by probing (round 4): each asserts the exact error, or that the
user's files are left as they were.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import random_outputs
from policycascade.agents.thresholds import ScoreSearch, ThresholdRule, shared_stop_scores
from policycascade.compare import reference
from policycascade.compare.api import compare_runs
from policycascade.compare.policies import CompareOptions
from policycascade.config import TrainConfig
from policycascade.data.label_noise import load_label_noise
from policycascade.evaluation import evaluate_rule
from policycascade.outputs_io import save_outputs


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A comparison of two small outputs files: two figure groups, no models."""
    root = tmp_path_factory.mktemp("outputs")
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        val, test = random_outputs(60, 3, 4, seed), random_outputs(60, 3, 4, seed + 10)
        path = root / f"{name}.npz"
        save_outputs({"val": val, "test": test}, path)
        paths.append(path)
    options = CompareOptions(("max-softmax",), (0.01,), (0.5,), sweep_points=3)
    return compare_runs(outputs=paths, options=options, processes=1)


@pytest.mark.parametrize("processes", ["2", 1.5, -1, None])
def test_write_refuses_bad_processes_before_creating_out(comparison, tmp_path, processes):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=f"processes must be an integer >= 0, got {processes!r}"):
        comparison.write(out, processes=processes)
    assert not out.exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_write_next_to_the_users_figure_creates_nothing(comparison, tmp_path, processes):
    """Before: the tables and TensorBoard runs were written, then the figure was refused."""
    (tmp_path / "tradeoff.png").write_text("mine")
    with pytest.raises(ValueError, match="tradeoff.png already exists: pass overwrite=True"):
        comparison.write(tmp_path, processes=processes)
    assert sorted(os.listdir(tmp_path)) == ["tradeoff.png"]
    assert (tmp_path / "tradeoff.png").read_text() == "mine"


def test_a_folder_where_a_file_goes_is_refused_before_writing(comparison, tmp_path):
    """Before (with overwrite): the tables and TensorBoard runs, then IsADirectoryError."""
    (tmp_path / "tradeoff.png").mkdir()
    with pytest.raises(ValueError, match="tradeoff.png is a folder: compare writes a file of"):
        comparison.write(tmp_path, overwrite=True, processes=1)
    assert sorted(os.listdir(tmp_path)) == ["tradeoff.png"]


def test_write_names_a_bad_out_or_overwrite(comparison, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out '.*file' is a file, not a folder"):
        comparison.write(tmp_path / "file")
    with pytest.raises(ValueError, match=r"out '.*sub' cannot be created: '.*file' is a file"):
        comparison.write(tmp_path / "file" / "sub")
    with pytest.raises(TypeError, match="out must be a folder path, got None"):
        comparison.write(None)
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'yes'"):
        comparison.write(tmp_path / "o", overwrite="yes")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_overwrite_replaces_links_and_never_writes_through_them(comparison, tmp_path):
    """Before: comparison.csv and the PNGs were written into the files the links named."""
    from policycascade.compare.report import figure_paths

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("comparison.csv", "tradeoff.png", "comparison.json"):
        (elsewhere / name).write_text("the user's")
        (out / name).symlink_to(elsewhere / name)
    written = comparison.write(out, overwrite=True, processes=1)
    assert all((elsewhere / name).read_text() == "the user's" for name in os.listdir(elsewhere))
    assert not any(p.is_symlink() for p in out.iterdir())
    pngs = sorted(p for p in written if p.suffix == ".png")
    assert pngs == sorted(figure_paths(out, comparison.rows))  # what is checked is what is drawn
    assert len(pngs) == 3  # the plain tag and one per group
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_write_leaves_whole_files_and_no_temporaries(
    comparison, tmp_path, monkeypatch
):
    """Ctrl-C while the helper saves a figure: the earlier file stays whole, no temporaries.

    Before: the helper wrote tradeoff.png in place, so stopping it left a truncated PNG.
    """
    import matplotlib.figure

    from policycascade.compare import report

    out, started = tmp_path / "out", tmp_path / "started"
    out.mkdir()
    before = {"comparison.csv": b"old csv", "tradeoff.png": b"old png"}
    for name, data in before.items():
        (out / name).write_bytes(data)

    def stuck_savefig(figure, path, **kwargs):  # runs in the forked helper
        Path(path).write_bytes(b"half a PNG")
        started.write_text("")
        time.sleep(60)  # until the pool stops the helper

    def interrupted(*args, **kwargs):  # Ctrl-C once the helper is half-way through a file
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", stuck_savefig)
    monkeypatch.setattr(report, "write_tensorboard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        comparison.write(out, overwrite=True, processes=2)
    assert started.exists()
    assert (out / "tradeoff.png").read_bytes() == b"old png"
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.json", "tradeoff.png"]
    assert (out / "comparison.csv").read_bytes().startswith(b"dataset,")  # written whole


def test_compare_runs_names_a_bad_reference_cache(tmp_path):
    with pytest.raises(TypeError, match="reference_cache must be a folder path or None, got 5"):
        compare_runs(outputs=[tmp_path / "x.npz"], reference_cache=5)


def _fake_run() -> SimpleNamespace:
    algorithm = SimpleNamespace(classifier_epochs=1)
    return SimpleNamespace(config=TrainConfig(), harness=SimpleNamespace(algorithm=algorithm))


def test_a_reference_cache_that_is_a_file_is_named(tmp_path):
    (tmp_path / "reference").write_text("mine")
    with pytest.raises(ValueError, match=r"reference cache '.*reference' is a file, not a folder"):
        reference.reference_outputs(_fake_run(), tmp_path / "reference")
    assert (tmp_path / "reference").read_text() == "mine"


def test_a_cached_reference_is_read_without_the_lock(tmp_path, monkeypatch):
    """Before: the lock file was created first, so a read-only cache could not be read."""
    run = _fake_run()
    config = run.config
    key = reference.reference_key(
        config.dataset,
        config.cascade,
        config.seed,
        1,
        reference.TrainingOptions.from_config(config),
        config.channels_last,
    )
    (tmp_path / key).write_bytes(b"cached")
    read = []

    def no_lock(lock):
        raise PermissionError(13, "Permission denied", str(lock))

    monkeypatch.setattr(reference, "_held", no_lock)
    monkeypatch.setattr(reference, "_trained_outputs", lambda *a: read.append(a[-1]) or "out")
    assert reference.reference_outputs(run, tmp_path) == "out"
    assert read == [tmp_path / key] and sorted(os.listdir(tmp_path)) == [key]


def test_evaluate_rule_refuses_stop_scores_it_would_misread():
    outputs = random_outputs(20, 3, 4)
    rule = ThresholdRule("max-softmax", [0.5, 0.5])
    scores = rule.stop_scores(outputs.probs)
    with pytest.raises(ValueError, match=r"stop_scores must hold real scores .*, got torch.bool"):
        evaluate_rule(rule, outputs, scores >= 0)  # decisions, not scores: all would stop
    with pytest.raises(ValueError, match=r"shape \(20, 2\), got ndarray of shape \(20, 2\)"):
        evaluate_rule(rule, outputs, scores.numpy())
    with pytest.raises(ValueError, match="got a tensor on the meta device"):
        evaluate_rule(rule, outputs, scores.to("meta"))
    with pytest.raises(ValueError, match="rule has 2 stages but the outputs have 3"):
        evaluate_rule(ThresholdRule("max-softmax", [0.5]), outputs)
    with pytest.raises(TypeError, match="outputs must be CascadeOutputs, got NoneType"):
        evaluate_rule(rule, None)
    with pytest.raises(TypeError, match="rule must be a stopping rule"):
        evaluate_rule(None, outputs)
    assert evaluate_rule(rule, outputs, scores.float()) == evaluate_rule(rule, outputs)


def _search_args(n: int = 12):
    outputs = random_outputs(n, 3, 4)
    scores = ThresholdRule("max-softmax", [0.0, 0.0]).confidences(outputs.probs)
    return scores, outputs.probs, outputs.labels, outputs.costs, lambda t: t


def test_score_search_names_what_it_cannot_fit_on():
    scores, probs, labels, costs, make = _search_args()
    with pytest.raises(ValueError, match="hold no samples: a search needs at least one"):
        ScoreSearch(scores[:0], probs[:0], labels[:0], costs, make)
    nan = scores.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="stop scores are NaN at sample 3, stage 1"):
        ScoreSearch(nan, probs, labels, costs, make)
    with pytest.raises(ValueError, match=r"scores must have shape \(12, 2\), got \(2, 12\)"):
        ScoreSearch(scores.T, probs, labels, costs, make)
    with pytest.raises(
        ValueError, match=r"answers must be a tensor of shape \(12, 3\), got \(12,\)"
    ):
        ScoreSearch(scores, probs, labels, costs, make, answers=labels)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\), got values"):
        ScoreSearch(scores, probs, labels + 4, costs, make)
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\) as probs, got \(5,\)"):
        ScoreSearch(scores, probs, labels[:5], costs, make)
    for bad in (True, 0, 2.5):
        with pytest.raises(
            ValueError, match=f"num_candidates must be None or an integer >= 1, got {bad!r}"
        ):
            ScoreSearch(scores, probs, labels, costs, make, bad)
    with pytest.raises(TypeError, match="costs must be StageCosts, got NoneType"):
        ScoreSearch(scores, probs, labels, None, make)
    one = ScoreSearch(scores[:1], probs[:1], labels[:1], costs, make)  # one sample fits
    assert len(one.for_accuracy_drop(0.0)) == 2


def test_shared_stop_scores_names_a_bad_memo_or_probs():
    outputs = random_outputs(5, 3, 4)
    rule = ThresholdRule("max-softmax", [0.5, 0.5])
    with pytest.raises(TypeError, match="memo must be a dict"):
        shared_stop_scores(rule, outputs.probs, None)
    with pytest.raises(ValueError, match=r"probs must be a tensor \(sample, K, classes\)"):
        shared_stop_scores(rule, outputs.probs.numpy(), {})
    assert torch.equal(shared_stop_scores(rule, outputs.probs, {}), rule.stop_scores(outputs.probs))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"base": ["digits"]},
            ValueError,
            r"base must be one of \['digits', 'synthetic'\], got \['digits'\]",
        ),
        (
            {"splits": ["all"]},
            ValueError,
            r"splits must be one of \['train', 'all'\], got \['all'\]",
        ),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"seed": None}, ValueError, "seed must be an integer >= 0, got None"),
        ({"flips": None}, TypeError, "flips must be a mapping of class -> class, got None"),
        ({"flips": [1, 7]}, TypeError, r"flips must be a mapping of class -> class, got \[1, 7\]"),
        ({"flips": {True: 7}}, ValueError, r"flips must name classes 0..9, got True"),
        ({"share": True}, ValueError, r"share must be in \[0, 1\], got True"),
    ],
)
def test_load_label_noise_names_the_bad_argument(kwargs, error, message):
    arguments = {"base": "synthetic", **kwargs}
    with pytest.raises(error, match=message):
        load_label_noise(**arguments)
