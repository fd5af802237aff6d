"""Freezing policies: when each layer freezes.

``Linear`` (Composer's schedule) is the default of :class:`layerfreeze.LayerFreezing`.
"""

from .base import Context, Policy, Progress
from .linear import Linear

__all__ = ["Policy", "Progress", "Context", "Linear"]
