"""policycascade: learned stopping policies over model cascades.

Importing the package registers the built-in gym ids (``policycascade/DigitsCascade-v0``).
"""

from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.costs import StageCosts, count_macs
from policycascade.envs import register_builtin, register_cascade

register_builtin()

__all__ = ["Cascade", "CascadeOutputs", "StageCosts", "count_macs", "register_cascade"]
__version__ = "0.1.0"
