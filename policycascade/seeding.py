"""Seeding torch's global generators for one piece of training, in one place.

:func:`~policycascade.runtime.seed_everything` seeds a whole run (Python, NumPy, torch);
the helpers here seed torch alone for one unit inside it: a classifier's initial weights
and whatever its training draws from the global generator (dropout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def seed_torch(seed: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device) with ``seed``.

    For a unit whose generator state belongs to the run: it is checkpointed with the run
    and carries on after the unit, so a resumed unit continues where it stopped.
    """
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generators seeded by ``seed``; restore them after.

    For library calls (a reference, a cross-fitting fold) whose randomness must depend on
    ``seed`` alone and must not move the caller's generators.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        seed_torch(seed)
        yield
