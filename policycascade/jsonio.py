"""JSON files that stay valid: NaN and infinities become null, writes are atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from policycascade.fsutil import written_whole


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, value: Any, indent: int = 2) -> None:
    """Write ``value`` as JSON through a temporary file renamed into place."""
    with written_whole(Path(path)) as tmp:
        tmp.write_text(json.dumps(finite_or_none(value), indent=indent))
