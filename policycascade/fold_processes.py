"""Training units in forked helper processes beside the run's own, on idle CPU cores.

The continuation learner's cross-fitting folds are independent: each seeds its own
generators and reads nothing another fold writes. On a CPU with idle cores (small
classifiers train fastest on one thread each), helper processes forked from the run
train some folds at the same time as the run trains the others. The run claims units
from the lowest number up, the helpers from the highest down, under one lock, so every
unit is trained exactly once; a helper sends what its unit produced (numpy arrays) back
through a pipe, and the run applies it when it reaches that unit. Results are bit for bit
those of one process (tests/test_fold_processes.py).

A helper ignores SIGINT (the run saves and stops on it), stops at the next unit when the
run is gone, and is terminated when the run closes the pool; a unit a helper had not
delivered is trained again by the run (on resume too), so a kill loses at most the
helpers' unfinished work, never a saved unit.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch

from policycascade.runtime import free_cores

FREE, BY_RUN, BY_HELPER = 0, 1, 2  # who claimed a unit
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def choose_processes(
    requested: int, units: int, device: str | torch.device, distributed: bool = False
) -> tuple[int, str]:
    """(processes to train ``units`` independent units with, why): the run's own counts as one.

    ``requested`` > 0 wins (capped at the units); 0 chooses: one process on CUDA, under
    torch.distributed, with more than one intra-op thread (the threads use the cores) or
    off Linux, else the free CPU cores.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"processes must be an integer >= 0, got {requested!r}")
    if units < 2:
        return 1, "fewer than 2 independent units"
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1, "no fork on this platform"
    if requested:
        return min(requested, units), "asked for with --processes (processes: in a config)"
    if torch.device(device).type != "cpu" or distributed:
        return 1, "not a single-process CPU run"
    if not sys.platform.startswith("linux"):
        return 1, "forked helpers are chosen on Linux only (macOS frameworks are not fork-safe)"
    if torch.get_num_threads() > 1:
        return 1, f"torch runs {torch.get_num_threads()} intra-op threads"
    cores, load = free_cores()
    load_text = "" if load is None else f", load average {load:.1f}"
    return min(cores, units), f"the free CPU cores ({cores} free{load_text})"


class UnitPool:
    """Helpers forked now that train ``units`` from the highest down with ``train_unit``.

    ``train_unit(unit)`` must return a picklable result (numpy arrays, numbers) that depends
    only on ``unit``; it runs in the helper, on the state the run had when the pool started.
    """

    def __init__(self, units: list[int], train_unit: Callable[[int], Any], helpers: int):
        if helpers < 1:
            raise ValueError(f"helpers must be >= 1, got {helpers}")
        context = multiprocessing.get_context("fork")
        self.units = sorted(units)
        self._lock = context.Lock()
        self._claims = context.Array("b", len(self.units), lock=False)
        self._results: dict[int, Any] = {}
        self._pipes, self._processes = [], []
        parent = os.getpid()
        for _ in range(helpers):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=self._helper, args=(send, train_unit, parent), daemon=True
            )
            process.start()
            send.close()
            self._pipes.append(receive)
            self._processes.append(process)

    # -- the run's side ------------------------------------------------------------------------

    def take(self, unit: int) -> Any | None:
        """A helper's result for ``unit`` (waiting for it), or None: the run trains it itself."""
        if unit not in self.units:
            return None
        index = self.units.index(unit)
        with self._lock:
            if self._claims[index] == FREE:
                self._claims[index] = BY_RUN
                return None
        while unit not in self._results:
            if not self._receive_one():  # every helper is gone without sending it
                return None
        return self._results.pop(unit)  # None: the helper failed; the run trains it and sees why

    def _receive_one(self) -> bool:
        """Wait for the next message from any helper; False when none is left alive."""
        ready = multiprocessing.connection.wait(self._pipes)
        for pipe in ready:
            try:
                unit, result = pipe.recv()
            except (EOFError, OSError):  # that helper exited
                self._pipes.remove(pipe)
                continue
            self._results[unit] = result
        return bool(self._pipes)

    def close(self) -> None:
        """Stop every helper now (their unfinished units are lost) and free the pipes."""
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()
        self._pipes, self._processes = [], []

    # -- the helper's side ---------------------------------------------------------------------

    def _claim_highest(self) -> int | None:
        with self._lock:
            for index in reversed(range(len(self.units))):
                if self._claims[index] == FREE:
                    self._claims[index] = BY_HELPER
                    return self.units[index]
        return None

    def _helper(self, send, train_unit: Callable[[int], Any], parent: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run saves and stops; it ends us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()
        if os.getppid() != parent:  # the run died before that took effect
            os._exit(0)
        torch.set_num_threads(1)
        for pipe in self._pipes:  # the run's ends of earlier helpers' pipes
            pipe.close()
        while os.getppid() == parent:
            unit = self._claim_highest()
            if unit is None:
                break
            try:
                result = train_unit(unit)
            except Exception:  # the run trains this unit itself and reports any error there
                send.send((unit, None))
                break
            send.send((unit, result))
        send.close()


def _die_with_parent() -> None:
    """Linux: have the kernel kill this helper when the run dies, even by SIGKILL.

    An orphaned helper would otherwise train on and hold the run's stdout and stderr open
    (a caller waiting for them would wait for it). Elsewhere the helper stops at its next
    unit once the run is gone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
