"""Custom ``psu`` ONNX domain: torch custom ops, their exporter translations and ONNX functions."""

from . import neuron  # noqa: F401  (registers the neuron ops)
from . import reset  # noqa: F401  (registers the probabilistic-reset op)
from .registry import DOMAIN, DOMAIN_VERSION, attach_functions, layer_spike_outputs, translation_table

__all__ = ["DOMAIN", "DOMAIN_VERSION", "attach_functions", "layer_spike_outputs", "translation_table"]
