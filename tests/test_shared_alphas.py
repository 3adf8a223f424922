"""Issue 21: a multi-alpha command trains the classifiers once and ends as separate runs would."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import policycascade.checkpointing as checkpointing
from policycascade import shared_units
from policycascade.checkpoint import CHECKPOINT_NAME
from policycascade.crossfit import ReferenceTraining
from policycascade.data import DataSplits, Split
from policycascade.train import main

FOLDS = 2
CLASSIFIER_EPOCHS = 2
FAST = ["--cv-classifier-epochs", str(CLASSIFIER_EPOCHS), "--cv-folds", str(FOLDS)]
FAST += ["--no-progress", "--device", "cpu", "--threads", "1"]
ALPHAS = ("1e-3", "3e-2")


def _train(logdir, alphas, monkeypatch) -> dict:
    """Run one command in this process, from an empty cache; per alpha: metrics and checkpoints.

    The checkpoints are the ones saved at the end of each epoch (keyed by epoch); ``steps``
    counts the classifier epochs the whole command trained.
    """
    shared_units.clear()
    saved, steps = [], [0]
    real_save, real_step = checkpointing.save_atomic, ReferenceTraining.step

    def save(state, path):
        real_save(state, path)
        if state["state"]["unit_in_progress"] is None:
            saved.append(copy.deepcopy(state))

    def step(self):
        steps[0] += 1
        return real_step(self)

    monkeypatch.setattr(checkpointing, "save_atomic", save)
    monkeypatch.setattr(ReferenceTraining, "step", step)
    assert main(["--alpha", *alphas, *FAST, "--logdir", str(logdir)]) == 0
    monkeypatch.undo()
    runs = {}
    for run in sorted(logdir.iterdir()):
        metrics = json.loads((run / "metrics.json").read_text())
        states = {s["epoch"]: s for s in saved if s["alpha"] == metrics["alpha"]}
        runs[metrics["alpha"]] = {"dir": run, "metrics": metrics, "checkpoints": states}
    return {"runs": runs, "steps": steps[0]}


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """The two-alpha command and one one-alpha command per alpha."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("alphas")
    together = _train(root / "together", ALPHAS, monkeypatch)
    alone = [_train(root / f"alone{i}", [a], monkeypatch) for i, a in enumerate(ALPHAS)]
    shared_units.clear()
    return together, alone


def test_two_alphas_train_the_classifiers_once(commands):
    together, alone = commands
    per_run = (1 + FOLDS) * CLASSIFIER_EPOCHS  # unit 0 and every fold
    assert [a["steps"] for a in alone] == [per_run, per_run]
    assert together["steps"] == per_run


def test_each_alphas_metrics_equal_its_own_commands(commands):
    together, alone = commands
    assert len(together["runs"]) == len(ALPHAS)
    for single in alone:
        ((alpha, run),) = single["runs"].items()
        assert together["runs"][alpha]["metrics"] == run["metrics"]


def test_every_epochs_checkpoint_equals_an_uninterrupted_runs(commands):
    """Weights, held-out outputs, history and every generator after each (copied) unit."""
    together, alone = commands
    for single in alone:
        ((alpha, run),) = single["runs"].items()
        shared = together["runs"][alpha]["checkpoints"]
        assert sorted(shared) == sorted(run["checkpoints"]) == list(range(1, FOLDS + 3))
        for epoch, own in run["checkpoints"].items():
            for key in ("epoch", "history", "state", "rng", "alpha", "classifier_macs"):
                assert shared_units.same(shared[epoch][key], own[key]), (alpha, epoch, key)


def test_a_run_of_a_shared_command_resumes_alone(commands, tmp_path):
    """The second alpha's checkpoint before its rule holds everything its resume needs."""
    together, alone = commands
    alpha = float(ALPHAS[1])
    source = together["runs"][alpha]
    run = tmp_path / source["dir"].name
    shutil.copytree(source["dir"], run)
    (run / "metrics.json").unlink()
    torch.save(source["checkpoints"][FOLDS + 1], run / CHECKPOINT_NAME)  # every unit but the rule
    shared_units.clear()
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == alone[1]["runs"][alpha]["metrics"]


# -- the cache on its own ----------------------------------------------------------------------


def _start(seed: int = 0) -> dict:
    return {"config": "c", "rng": torch.Generator().manual_seed(seed).get_state()}


def test_join_shares_only_across_new_alphas_of_one_key_and_start():
    shared_units.clear()
    first = shared_units.join("c", _start(), 0.1)
    first.record(0, {"w": torch.ones(2)}, {"m": 1.0}, {"r": 1})
    assert shared_units.join("c", _start(), 0.2) is first  # another alpha: shares
    assert shared_units.join("c", _start(), 0.3).unit(0).metrics == {"m": 1.0}
    assert shared_units.join("c", _start(), 0.2) is not first  # an alpha again: trains again
    assert shared_units.join("c", _start(1), 0.4).unit(0) is None  # another start state
    assert shared_units.join("d", _start(1), 0.5).unit(0) is None  # another configuration
    shared_units.clear()


def test_records_are_copies_kept_in_epoch_order():
    entry = shared_units.SharedUnits("c", {})
    weights = torch.zeros(3)
    entry.record(1, {"w": weights}, {}, {})  # not the next unit: ignored
    assert entry.unit(0) is None
    entry.record(0, {"w": weights}, {"m": 2.0}, {})
    weights += 1  # the run goes on changing its tensors
    taken = entry.unit(0)
    taken.state["w"] -= 5  # and so does the run that takes them
    assert torch.equal(entry.unit(0).state["w"], torch.zeros(3))


def test_same_is_exact_on_nested_states():
    a = {"t": torch.arange(3.0), "n": (np.arange(2), 1, [0.5, "x"])}
    assert shared_units.same(a, copy.deepcopy(a))
    changed = copy.deepcopy(a)
    changed["n"][0][1] = 7
    assert not shared_units.same(a, changed)
    assert not shared_units.same({"t": torch.arange(3.0)}, {"t": torch.arange(3)})  # dtype
    assert not shared_units.same((1, 2), [1, 2])
    nan = torch.tensor([1.0, float("nan")])
    assert shared_units.same(nan, nan.clone())  # the held-out outputs not yet scored
    assert not shared_units.same(nan, torch.tensor([1.0, 2.0]))


def test_data_digest_sees_one_changed_sample():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (20, 1, 4, 4), generator=g, dtype=torch.uint8), torch.zeros(20)
    data = DataSplits("d", Split(x, y), Split(x, y), Split(x, y), 2)
    other = DataSplits("d", Split(x.clone(), y), Split(x, y), Split(x, y), 2)
    assert shared_units.data_digest(data) == shared_units.data_digest(other)
    other.train.x[3, 0, 1, 2] += 1
    assert shared_units.data_digest(data) != shared_units.data_digest(other)
