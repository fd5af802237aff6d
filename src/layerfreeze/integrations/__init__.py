"""Trainer integrations: each module maps one trainer's events onto :class:`layerfreeze.LayerFreezing`.

Import the one you use; each imports its trainer only then, so ``import layerfreeze``
needs torch alone:

- ``layerfreeze.integrations.lightning.LayerFreezingCallback`` (lightning.pytorch Callback)
- ``layerfreeze.integrations.transformers.LayerFreezingCallback`` (transformers TrainerCallback)
- ``layerfreeze.integrations.composer.LayerFreezing`` (Composer Algorithm)
"""

__all__: list[str] = []
