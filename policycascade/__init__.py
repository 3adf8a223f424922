"""policycascade: learned stopping policies over model cascades.

Importing the package registers the built-in gym ids (``policycascade/DigitsCascade-v0``).
"""

from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.costs import StageCosts, count_macs
from policycascade.envs import register_builtin, register_cascade

register_builtin()


def __getattr__(name: str):
    """``load_run`` and ``train_policy`` without importing the training stack on every import."""
    if name in ("load_run", "LoadedRun", "train_policy"):
        from policycascade import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'policycascade' has no attribute {name!r}")


__all__ = [
    "Cascade",
    "CascadeOutputs",
    "LoadedRun",
    "StageCosts",
    "count_macs",
    "load_run",
    "register_cascade",
    "train_policy",
]
__version__ = "0.1.0"
