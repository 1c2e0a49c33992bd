"""psu-export: trained spiking neural networks to time-parallel ONNX, with parity reports."""

__version__ = "0.1.0"
