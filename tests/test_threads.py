"""Threads that fit the work (issue 21): the choice, its precedence, its log line, the bench."""

import dataclasses
import subprocess

import pytest
import torch

import policycascade.bench as bench
import policycascade.runtime as runtime
from policycascade.config import TrainConfig
from policycascade.runtime import SMALL_WORK_MACS, choose_threads, configure_threads
from policycascade.runtime import _other_runnable_tasks as _real_other_runnable_tasks
from policycascade.train import thread_choice


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """Each test starts from torch's default (no env var) and leaves the count as it was."""
    previous = torch.get_num_threads()
    for name in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.setattr(runtime, "_physical_cores", lambda: 8)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(runtime, "_other_runnable_tasks", lambda: None)  # the load average
    torch.set_num_threads(8)  # what torch picks on an 8-core machine
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("load, free", [(0.0, 8), (0.4, 8), (2.6, 5), (7.9, 1), (30.0, 1)])
def test_large_work_gets_the_free_cores(monkeypatch, load, free):
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    choice = choose_threads(None, SMALL_WORK_MACS, "cpu")
    assert choice.threads == free
    assert f"load average {load:.1f}" in choice.reason
    assert choose_threads(None, 10, "cuda").threads == free  # CUDA: the free cores too


def test_runnable_tasks_now_win_over_the_load_average(monkeypatch):
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # work that ended
    monkeypatch.setattr(runtime, "_other_runnable_tasks", lambda: 3)
    assert runtime.free_cores() == (5, 6.0)
    monkeypatch.setattr(runtime, "_other_runnable_tasks", lambda: 20)
    assert runtime.free_cores() == (1, 6.0)


def test_other_runnable_tasks_reads_linux_or_says_none():
    others = _real_other_runnable_tasks(looks=2, pause_s=0.0)
    assert others is None or (isinstance(others, int) and others >= 0)


def test_small_work_gets_one_thread_and_says_why():
    choice = choose_threads(None, SMALL_WORK_MACS - 1, "cpu", "cascade 'digits'")
    assert choice.threads == 1
    assert choice.message().startswith("threads: 1 (cascade 'digits': small classifiers")


def test_user_settings_win_in_order(monkeypatch):
    # --threads / threads: beats everything, the environment included
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(2, 10).threads == 2
    # OMP_NUM_THREADS is kept over the work's choice (torch read it at start-up)
    torch.set_num_threads(3)
    choice = choose_threads(None, 10)
    assert (choice.threads, choice.reason) == (3, "kept: OMP_NUM_THREADS=3 in the environment")
    monkeypatch.delenv("OMP_NUM_THREADS")
    # an earlier torch.set_num_threads call is kept too
    torch.set_num_threads(5)
    choice = choose_threads(None, 10)
    assert choice.threads == 5 and "torch.set_num_threads(5)" in choice.reason


def test_configure_applies_logs_and_does_not_take_its_own_choice_for_the_users(monkeypatch):
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    lines = []
    assert configure_threads(None, 10, log=lines.append).threads == 1
    assert torch.get_num_threads() == 1 and len(lines) == 1 and lines[0].startswith("threads: 1")
    # the 1 set above is this module's, not the user's: a large job gets the cores
    assert configure_threads(None, None, log=None).threads == 8
    assert torch.get_num_threads() == 8
    # a user's own count is kept by the next call as well
    torch.set_num_threads(6)
    configure_threads(None, 10, log=None)
    assert torch.get_num_threads() == 6
    assert configure_threads(None, 10, log=None).reason.startswith("kept")


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_requests_name_the_argument(bad, error):
    with pytest.raises(error, match="threads must be an integer >= 0"):
        choose_threads(bad)


def test_the_train_command_chooses_from_its_config(monkeypatch):
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    lines = []
    digits = thread_choice(TrainConfig(device="cpu"), lines.append)
    # digits: the CNN's 152,384 MACs x batch 64
    assert digits.threads == 1 and "9,752,576 MACs per step" in lines[0]
    asked = thread_choice(dataclasses.replace(TrainConfig(device="cpu"), threads=3), None)
    assert asked.threads == 3 and "--threads" in asked.reason
    paper = dataclasses.replace(TrainConfig(device="cpu"), cascade="cifar-resnet")
    assert thread_choice(paper, None).threads == 7  # 8 cores, load 1.0


def test_contention_case_reports_side_by_side_ratios_and_stops_its_neighbours(monkeypatch):
    started: list[subprocess.Popen] = []
    real_start = bench.start_neighbours

    def start(count):
        procs = real_start(count)
        started.extend(procs)
        return procs

    monkeypatch.setattr(bench, "start_neighbours", start)
    calls = []
    result = bench.bench_contention(
        lambda: calls.append(torch.get_num_threads()), 2, 1, {"a": 2, "b": 1}
    )
    assert len(started) == 4 and all(p.poll() is not None for p in started)  # all reaped
    assert calls == [2] * 5 + [1] * 5  # warm-up + 2 alone + 2 busy per setting
    for row in result["rows"]:
        assert row["ratio"] == row["with_neighbours_s"] / row["alone_s"]
        assert len(row["alone_all_s"]) == len(row["with_neighbours_all_s"]) == 2
    assert torch.get_num_threads() == 8  # restored
    assert "ratio" in "\n".join(bench.format_contention(result))
