"""Users' own cached outputs as comparison input: files with a validation and a test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from policycascade.cascade import CascadeOutputs


def unique_paths(paths: Sequence[str], option: str) -> list[Path]:
    """The paths, each once (the same file twice would count one cascade twice)."""
    seen: dict[Path, str] = {}
    for text in paths:
        resolved = Path(text).resolve()
        if resolved in seen:
            raise ValueError(f"{option} names {seen[resolved]!r} twice ({text!r}): give it once")
        seen[resolved] = text
    return [Path(text) for text in seen.values()]


def read_outputs_file(path: Path) -> tuple[str, CascadeOutputs, CascadeOutputs]:
    """(name, val, test) of an outputs file; both splits must be in it."""
    from policycascade.outputs_io import load_outputs

    splits = load_outputs(path)
    missing = [s for s in ("val", "test") if s not in splits]
    if missing:
        raise ValueError(
            f"--outputs {str(path)!r} has no {' and no '.join(repr(s) for s in missing)} split "
            f"(it holds {sorted(splits)}): a comparison fits rules on 'val' and reports them on "
            "'test'; add a split column (docs/outputs-format.md)"
        )
    val, test = splits["val"], splits["test"]
    if (val.num_stages, val.num_classes) != (test.num_stages, test.num_classes):
        raise ValueError(
            f"--outputs {str(path)!r}: val has {val.num_stages} stages and {val.num_classes} "
            f"classes but test has {test.num_stages} and {test.num_classes}"
        )
    return path.stem, val, test


def stage_names(outputs: CascadeOutputs) -> list[str]:
    """The outputs' stage names, or ``stage0``, ``stage1``, ... where it has none."""
    names = getattr(outputs, "names", None)
    return list(names) if names else [f"stage{t}" for t in range(outputs.num_stages)]
