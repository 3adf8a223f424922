"""Cross-fitting folds trained in forked helper processes end bit for bit as in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from policycascade import fold_processes
from policycascade.checkpoint import load_checkpoint
from policycascade.config import ConfigError, config_from_dict
from policycascade.fold_processes import UnitPool, choose_processes
from policycascade.train import main

FAST = ["--cv-classifier-epochs", "2", "--cv-folds", "3", "--no-progress", "--device", "cpu"]


def _same(a, b, path="") -> list[str]:
    """Paths where two checkpoint trees differ (NaN equals NaN)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [path]
        return [d for k in a for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [path]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (u, v) in pairs for d in _same(u, v, f"{path}[{i}]")]
    if torch.is_tensor(a):
        return [] if torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) else [path]
    if hasattr(a, "__array__"):
        return [] if (a == b).all() else [path]
    return [] if a == b or (a != a and b != b) else [path]


def _run(logdir, processes: int) -> dict:
    args = ["--alpha", "1e-2", *FAST, "--processes", str(processes), "--logdir", str(logdir)]
    assert main(args) == 0
    (run,) = list(logdir.iterdir())
    checkpoint = load_checkpoint(run)
    checkpoint["config"].pop("logdir")
    assert checkpoint["config"].pop("processes") == processes
    return checkpoint


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict:
    """The checkpoint of the run trained in one process."""
    return _run(tmp_path_factory.mktemp("one"), 1)


def test_helper_processes_give_the_one_process_checkpoint_bit_for_bit(alone, tmp_path, monkeypatch):
    helpers = []
    real = UnitPool.__init__

    def counted(self, units, train_unit, count):
        helpers.append((list(units), count))
        real(self, units, train_unit, count)

    monkeypatch.setattr(UnitPool, "__init__", counted)
    together = _run(tmp_path / "three", 3)
    assert helpers == [([1, 2, 3], 2)]  # forked at the classifiers' unit, folds 1-3 open
    assert _same(alone, together) == []  # weights, held-out outputs, rule, every generator


def _square(unit: int) -> dict:
    return {"unit": unit, "value": unit * unit, "pid": os.getpid()}


def test_every_unit_is_trained_once_lowest_by_the_run_highest_by_helpers():
    pool = UnitPool([1, 2, 3, 4, 5, 6], _square, helpers=2)
    try:
        time.sleep(0.5)  # the helpers claim everything while the run waits
        taken = {u: pool.take(u) for u in (1, 2, 3, 4, 5, 6)}
    finally:
        pool.close()
    for unit, result in taken.items():
        assert result == {"unit": unit, "value": unit * unit, "pid": result["pid"]}
        assert result is None or result["pid"] != os.getpid()
    pool = UnitPool([1, 2, 3], _nap, helpers=1)
    try:
        assert pool.take(1) is None  # the helper starts at the top: the run keeps unit 1
        time.sleep(0.3)  # the helper has claimed unit 3 (it sleeps in it)
        assert pool.take(3) == {"unit": 3} and pool.take(2) == {"unit": 2}
        assert pool.take(1) is None and pool.take(7) is None  # not a pool unit: the run's
    finally:
        pool.close()


def _nap(unit: int) -> dict:
    time.sleep(0.5)
    return {"unit": unit}


def _fails_on_two(unit: int) -> dict:
    if unit == 2:
        raise RuntimeError("boom")
    return {"unit": unit}


def test_a_failing_helper_leaves_its_unit_to_the_run():
    pool = UnitPool([1, 2], _fails_on_two, helpers=1)
    try:
        time.sleep(0.3)
        assert pool.take(2) is None  # the run trains it and meets the error itself
        assert pool.take(1) in (None, {"unit": 1})
    finally:
        pool.close()


def _slow(unit: int) -> dict:
    time.sleep(30)
    return {"unit": unit}


def test_close_stops_helpers_at_once():
    pool = UnitPool([1, 2], _slow, helpers=1)
    processes = list(pool._processes)
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 10
    assert not any(p.is_alive() for p in processes)


def test_choice_of_processes(monkeypatch):
    monkeypatch.setattr(fold_processes, "free_cores", lambda: (4, 0.3))
    assert choose_processes(0, 6, "cpu")[0] == 4
    assert choose_processes(0, 3, "cpu")[0] == 3  # never more than the units
    assert choose_processes(2, 6, "cpu")[0] == 2
    assert choose_processes(8, 3, "cpu")[0] == 3
    assert choose_processes(0, 1, "cpu")[0] == 1
    assert choose_processes(0, 6, "cpu", distributed=True)[0] == 1
    monkeypatch.setattr(fold_processes.sys, "platform", "darwin")
    assert choose_processes(0, 6, "cpu")[0] == 1 and choose_processes(2, 6, "cpu")[0] == 2
    monkeypatch.setattr(fold_processes.sys, "platform", "linux")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    number, reason = choose_processes(0, 6, "cpu")
    assert number == 1 and "2 intra-op threads" in reason
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="processes must be an integer >= 0"):
            choose_processes(bad, 6, "cpu")


def test_processes_must_not_be_negative():
    with pytest.raises(ConfigError, match="processes"):
        config_from_dict({"processes": -1})
    assert config_from_dict({"processes": 2}).processes == 2


def test_a_run_stopped_while_helpers_train_resumes_to_the_same_checkpoint(
    alone, tmp_path, monkeypatch
):
    import multiprocessing
    import signal

    import policycascade.checkpointing as checkpointing

    saves, real_save = {"count": 0}, checkpointing.save_atomic

    def save_then_signal(state, path):
        real_save(state, path)
        saves["count"] += 1
        if saves["count"] == 1:  # the classifiers' unit, epoch 1 of 2: helpers are training
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpointing, "save_atomic", save_then_signal)
    args = ["--alpha", "1e-2", *FAST, "--processes", "3", "--logdir", str(tmp_path / "b")]
    assert main(args) == 130
    assert multiprocessing.active_children() == []  # the stop ended the helpers too
    monkeypatch.setattr(checkpointing, "save_atomic", real_save)
    (run,) = list((tmp_path / "b").iterdir())
    assert load_checkpoint(run)["epoch"] == 0
    assert main(["--resume", str(run), "--no-progress"]) == 0
    resumed = load_checkpoint(run)
    resumed["config"].pop("logdir")
    assert resumed["config"].pop("processes") == 3
    assert _same(alone, resumed) == []


def test_processes_is_refused_where_no_fold_is_trained():
    for values in ({"agent": "reinforce"}, {"continuation": {"folds": 0}}):
        with pytest.raises(ConfigError, match="processes"):
            config_from_dict({**values, "processes": 2})
    assert main(["--agent", "ltc", "--processes", "2", "--dry-run"]) == 2


HELPER_ORPHAN = """
import os, signal, sys, time
from policycascade.fold_processes import UnitPool

def slow(unit):
    time.sleep(60)

pool = UnitPool([1, 2], slow, helpers=1)
print(pool._processes[0].pid, flush=True)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
def test_a_helper_dies_with_a_killed_run_and_releases_its_output():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HELPER_ORPHAN], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 30  # nobody held the pipes for the helper's 60 s
    helper = int(done.stdout.split()[0])
    time.sleep(0.2)
    try:  # gone, or dead and waiting to be reaped by whoever adopted it
        with open(f"/proc/{helper}/status", encoding="ascii") as handle:
            state = next(line for line in handle if line.startswith("State:"))
        assert "Z" in state.split()[1], state
    except FileNotFoundError:
        pass
