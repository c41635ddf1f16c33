"""Running compiled gfcompile artifacts on a device: needs onnxruntime-training and numpy, never torch."""

from .errors import RunError

__all__ = ["RunError"]
