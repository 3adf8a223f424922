"""Process-wide run settings: device choice, seeding and CPU threads, each in one place."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if present, else CPU; anything else is checked and returned."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here")
    return resolved


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic torch algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


# -- CPU threads --------------------------------------------------------------------------------
#
# torch sizes its intra-op pool to every core. For small classifiers (the digits cascade: a
# 64-sample batch through 152k MACs) each op is too short to gain from threads, and when other
# processes share the cores the pool's threads spin and wait for each other: measured on 2
# cores, the default job took 18.7 s alone and 108 s next to two busy processes, and 22.9 s /
# 36.1 s with one thread. Large models and batches (CIFAR, ImageNet) do gain from threads.

# MACs per step (largest classifier x batch) below which one thread is the faster choice.
SMALL_WORK_MACS = 50_000_000
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_applied: int | None = None  # the count this module set last (not a user's own setting)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen for a run and the reason, as the run's log states it."""

    threads: int
    reason: str

    def message(self) -> str:
        """One line for the run's log."""
        return f"threads: {self.threads} ({self.reason})"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def free_cores() -> tuple[int, float | None]:
    """(cores not busy with other work, 1-minute load average): at least 1.

    Busy cores are the other tasks runnable right now (Linux: ``/proc/loadavg``, the least
    of a few looks, so that a short-lived process does not count), else the 1-minute load
    average, which also remembers work that has just ended.
    """
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    others = _other_runnable_tasks()
    if others is None:
        if load is None:
            return cores, None
        others = int(load + 0.5)
    return max(1, min(cores, cores - others)), load


def _other_runnable_tasks(looks: int = 5, pause_s: float = 0.02) -> int | None:
    """Runnable tasks other than this one now (the least of ``looks``), None off Linux."""
    counts = []
    try:
        for _ in range(looks):
            with open("/proc/loadavg", encoding="ascii") as handle:
                counts.append(int(handle.read().split()[3].split("/")[0]))
            time.sleep(pause_s)
    except (OSError, ValueError, IndexError):
        return None
    return max(0, min(counts) - 1)  # this process is running while it reads the file


def _physical_cores() -> int | None:
    """Physical cores from /proc/cpuinfo (torch's own default on Linux), None if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return None
    pairs, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            pairs.add((physical, value.strip()))
    return len(pairs) or None


def _set_by_user() -> str | None:
    """How the user set torch's thread count before this run, or None for torch's default."""
    for name in THREAD_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return f"{name}={value} in the environment"
    current = torch.get_num_threads()
    if current == _applied:
        return None
    defaults = {available_cores(), os.cpu_count() or 0, _physical_cores() or 0}
    if current not in defaults:
        return f"torch.set_num_threads({current}) called before the run"
    return None


def choose_threads(
    requested: int | None = None,
    work_macs: int | None = None,
    device: str | torch.device = "cpu",
    work: str = "",
) -> ThreadChoice:
    """The intra-op thread count for a run, and why: the user's setting first, else the work's.

    ``requested`` (``--threads N`` / ``threads: N``; None or 0: not given) wins; then
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` or an earlier ``torch.set_num_threads`` call are
    kept; otherwise small work (``work_macs``, MACs of the largest classifier times the
    batch, below :data:`SMALL_WORK_MACS`) gets 1 thread, and large work, unknown work or a
    CUDA device the cores that are free. ``work`` describes the work for the reason.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)):
        raise TypeError(f"threads must be an integer >= 0, got {requested!r}")
    if requested is not None and requested < 0:
        raise ValueError(f"threads must be an integer >= 0, got {requested}")
    if requested:
        return ThreadChoice(requested, "asked for with --threads (threads: in a config)")
    user = _set_by_user()
    if user is not None:
        current = torch.get_num_threads()
        note = "" if str(current) in user else f"; torch now runs {current}, set in this process"
        return ThreadChoice(current, f"kept: {user}{note}")
    what = f"{work}: " if work else ""
    if torch.device(device).type == "cuda":
        cores, load = free_cores()
        return ThreadChoice(cores, f"{what}CUDA run, the free CPU cores{_load_text(load)}")
    if work_macs is not None and work_macs < SMALL_WORK_MACS:
        return ThreadChoice(
            1,
            f"{what}small classifiers ({work_macs:,} MACs per step < {SMALL_WORK_MACS:,}) run "
            "fastest on one thread, and more threads spin when other processes share the "
            "cores; --threads N overrides",
        )
    cores, load = free_cores()
    size = "work of unknown size" if work_macs is None else f"{work_macs:,} MACs per step"
    return ThreadChoice(cores, f"{what}{size}: the free CPU cores{_load_text(load)}")


def _load_text(load: float | None) -> str:
    if load is None:
        return ""
    return f" ({available_cores()} cores, load average {load:.1f})"


def configure_threads(
    requested: int | None = None,
    work_macs: int | None = None,
    device: str | torch.device = "cpu",
    work: str = "",
    log: Callable[[str], None] | None = print,
) -> ThreadChoice:
    """Apply :func:`choose_threads`'s choice to torch and ``log`` its one-line reason."""
    global _applied
    choice = choose_threads(requested, work_macs, device, work)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if not choice.reason.startswith("kept:"):  # a user's own setting stays theirs next time too
        _applied = choice.threads
    if log is not None:
        log(choice.message())
    return choice
