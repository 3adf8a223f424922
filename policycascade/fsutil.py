"""File-system steps that must be atomic when several processes share a folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


def check_new_file(path: Path, option: str, overwrite: bool = False) -> None:
    """Refuse, before any work, a file path that would replace the user's file.

    Also refused: a folder at the path, or a file where a parent folder should be.
    """
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {str(path)!r} exists; pass --overwrite to replace it")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be created: {str(parent)!r} is a file")


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor.

    That ancestor is where creating ``path`` would write.
    """
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (beside it, hidden)."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """The temporary path to write ``path``'s content to; renamed onto ``path`` at the end.

    A failure or interruption in the body removes it instead: ``path`` is the earlier file
    or a whole new one, never half of one, and a link at ``path`` is replaced, never
    written through.
    """
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
