"""layerfreeze: progressive layer freezing for PyTorch, exact and resumable.

Modules: ``layers`` (which layers, in what order), ``schedule`` (progress to
depth), ``freezer`` (the rule for which parameters a depth freezes, and applying
it), ``functional`` (Composer's ``freeze_layers``), ``algorithm``
(``LayerFreezing``: events, decisions) with ``state`` (its checkpoint state),
``validation`` (argument checks) and ``hints`` (warnings); ``policies`` (when to
freeze: ``Linear``, ``FreezeOut``, ``GradientChange``, ``Convergence``); ``cache``
(frozen-prefix activation caching); ``gradient_bridge`` (frozen layers before
reentrant activation checkpointing); ``distributed`` (DDP, FSDP, ZeRO);
``integrations`` (Lightning, Transformers, Composer).

Example:
    >>> import torch, layerfreeze as lf
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> freezing = lf.LayerFreezing(freeze_start=0.5).attach(net, opt, total_steps=10, steps_per_epoch=5)
"""

from . import cache, policies
from .algorithm import LAYERS_FROZEN, PARAMS_FROZEN, PERCENTAGE_FROZEN, LayerFreezing
from .freezer import Freezer, freeze_parameters
from .functional import freeze_layers
from .cache import PrefixCache
from .encoder_cache import EncoderCache
from .layers import Layer, definition_order, execution_order, layer_flops

__version__ = "0.1.0"

__all__ = [
    "freeze_layers",
    "LayerFreezing",
    "policies",
    "cache",
    "PrefixCache",
    "EncoderCache",
    "Freezer",
    "freeze_parameters",
    "Layer",
    "definition_order",
    "execution_order",
    "layer_flops",
    "LAYERS_FROZEN",
    "PERCENTAGE_FROZEN",
    "PARAMS_FROZEN",
    "__version__",
]
