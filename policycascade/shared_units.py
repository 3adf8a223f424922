"""Training units shared by the runs of one process that differ only in alpha (issue 21).

A command with several alphas makes one run per alpha, and the continuation learner's
classifier and cross-fitting units do not depend on alpha. The first run records the end
state of each such unit here (the algorithm's part, its metrics and every random
generator's state); a later run of the same configuration, data and start state but
another alpha copies them in instead of training again, so that it ends bit for bit as if
it had trained them itself, with its own full checkpoint. The cache holds one
configuration at a time (a command runs its alphas one after another), in memory only.

A second run with an alpha already seen is trained again: in one process that is a
deliberate repetition (a reproducibility or interruption check), not a sweep over alphas.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from policycascade.config import TrainConfig
    from policycascade.data import DataSplits
    from policycascade.harness import RunHarness


@dataclass
class UnitRecord:
    """The end of one finished unit: the algorithm's state after it, its metrics, the RNGs."""

    state: dict[str, Any]
    metrics: dict[str, float]
    rng: dict[str, Any]


@dataclass
class SharedUnits:
    """The units recorded so far for one configuration and start state, in epoch order."""

    key: str
    start: dict[str, Any]
    alphas: set[float] = field(default_factory=set)
    units: list[UnitRecord] = field(default_factory=list)

    def record(self, epoch: int, state: dict[str, Any], metrics: dict[str, float], rng: dict):
        """Keep unit ``epoch``'s end (copied) if it is the next one; a gap or repeat is ignored."""
        if epoch == len(self.units):
            self.units.append(UnitRecord(copy.deepcopy(state), dict(metrics), copy.deepcopy(rng)))

    def unit(self, epoch: int) -> UnitRecord | None:
        """A copy of unit ``epoch``'s record (the cache stays as recorded), or None."""
        if epoch >= len(self.units):
            return None
        return copy.deepcopy(self.units[epoch])


_cache: dict[str, SharedUnits | None] = {"entry": None}


def join(key: str, start: dict[str, Any], alpha: float) -> SharedUnits:
    """The entry a run with this key, start state and alpha reads from and adds to.

    The recorded one if key and start state match and ``alpha`` has not run with it yet;
    otherwise a new, empty entry that replaces it.
    """
    entry = _cache["entry"]
    if entry is None or entry.key != key or alpha in entry.alphas or not same(entry.start, start):
        entry = SharedUnits(key, copy.deepcopy(start))
        _cache["entry"] = entry
    entry.alphas.add(alpha)
    return entry


def clear() -> None:
    """Forget every recorded unit (frees the memory they hold)."""
    _cache["entry"] = None


def config_fingerprint(config: TrainConfig) -> str:
    """Every option of ``config`` except the agent's alpha, as canonical JSON."""
    values = config.to_dict()
    kept = {
        key: {k: v for k, v in value.items() if k != "alpha"} if isinstance(value, dict) else value
        for key, value in values.items()
    }
    return json.dumps(kept, sort_keys=True, default=str)


def data_digest(data: DataSplits, splits: tuple[str, ...] = ("train", "val")) -> str:
    """SHA-1 of the named splits' inputs and labels (bytes, dtype and shape)."""
    digest = hashlib.sha1()
    for name in splits:
        split = data.split(name)
        for tensor in (split.x, split.y):
            flat = tensor.detach().contiguous().reshape(-1).cpu()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rng_states(harness: RunHarness) -> dict[str, Any]:
    """Every generator a run draws from: Python, NumPy, torch (CPU, CUDA) and the harness's."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "shuffle": harness.shuffle_generator.get_state(),
        "sample": harness.sample_generator.get_state(),
    }


def restore_rng_states(harness: RunHarness, states: dict[str, Any]) -> None:
    """Set every generator of :func:`rng_states` back to ``states``."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    harness.shuffle_generator.set_state(states["shuffle"])
    harness.sample_generator.set_state(states["sample"])


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts, lists, tuples, tensors, arrays and scalars (NaN = NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if (a.dtype, a.device, a.shape) != (b.dtype, b.device, b.shape):
            return False
        if a.is_floating_point() or a.is_complex():  # NaN marks "not yet" (held-out outputs)
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b
