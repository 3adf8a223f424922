"""Checkpoints written atomically: a crash at any moment leaves the previous one loadable."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or was not written by policycascade."""


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, fsync, then rename it into place."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(run_dir: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Delete what a kill during :func:`save_atomic` left beside a checkpoint; returns the paths.

    Call it only where no other process writes to ``run_dir`` (when resuming the run).
    """
    removed = []
    for stale in Path(run_dir).glob(f".{name}.tmp-*"):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def state_dict_mismatch(error: Exception, limit: int = 300) -> str:
    """One line from a ``load_state_dict`` error: its missing or unexpected keys, cut short."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    detail = " ".join(lines[1:3] or lines[:1])
    return detail if len(detail) <= limit else detail[:limit] + " ..."


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, with a clear error if it is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated "
            f"({type(error).__name__})"
        ) from error
    return state
