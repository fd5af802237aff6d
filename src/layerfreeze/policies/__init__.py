"""Freezing policies: when each layer freezes.

``Linear`` (Composer's schedule) is the default of :class:`layerfreeze.LayerFreezing`.
``FreezeOut`` anneals each layer's learning rate to zero on its own schedule
(Brock et al. 2017); ``GradientChange`` freezes layers whose gradient norm stopped
changing (after AutoFreeze, Liu et al. 2021); ``Convergence`` freezes layers whose
output on a probe batch stopped changing (after SVCCA, Raghu et al. 2017);
``FixedDepth`` freezes a fixed set of leading layers once (the fine-tuning recipe).
"""

from .base import Context, Policy, Progress
from .convergence import Convergence
from .fixed import FixedDepth
from .freezeout import FreezeOut
from .gradient import GradientChange
from .linear import Linear

__all__ = ["Policy", "Progress", "Context", "Linear", "FreezeOut", "GradientChange", "Convergence", "FixedDepth"]
