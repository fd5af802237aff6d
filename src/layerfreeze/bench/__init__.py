"""Bundled models, data and the benchmark harness behind ``layerfreeze bench``."""
