"""File-system steps that must be atomic when several processes share a folder."""

from __future__ import annotations

from pathlib import Path


def claim_new_dir(parent: Path, name: str) -> Path:
    """Create and return ``parent/name``, or the first free ``name-2``, ``name-3``, ...

    ``mkdir`` either creates the directory or fails, so two processes never claim the
    same one, and a directory that existed before is never reused.
    """
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, n = parent / f"{name}-{n}", n + 1
