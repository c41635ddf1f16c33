"""gfcompile: an ONNX training-graph compiler for on-device CNN fine-tuning."""

__version__ = "0.1.0"
