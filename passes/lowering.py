"""What the `lower_*` passes share. Not a pass: it rewrites nothing.

The lowering passes replace onnxruntime-training's ops (com.microsoft ConvGrad, ReluGrad, ...) by
standard `ai.onnx` ops, so plain onnxruntime and other ONNX runtimes can run the training step.
Each replacement detaches the replaced node and writes its output tensors (same names, same
readers) from standard ops emitted under one fresh scope per replaced node.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_graphsurgeon as gs

from .emitter import Emitter
from .names import GRADIENT_SUFFIX, NameAllocator

LOWERED_SCOPE = "lowered"


def gradient_output_name(parameter: str) -> str:
    """The graph output that carries `parameter`'s gradient once `lower_training_ops` has run.

    It is the output of the parameter's gradient accumulator, which onnxruntime-training names
    this way; the lowering turns that output into the gradient itself.
    """
    return f"{parameter}{GRADIENT_SUFFIX}.accumulation.out"


def emitter_for(graph: gs.Graph, names: NameAllocator, node: gs.Node) -> Emitter:
    """An emitter whose scope is named after the node it replaces."""
    return Emitter(graph, names, f"{node.name or node.op}/{LOWERED_SCOPE}")


def detach(node: gs.Node) -> list[gs.Variable | None]:
    """Disconnect `node` and return its outputs (None for an omitted optional output)."""
    outputs = [t if t.name else None for t in node.outputs]
    node.inputs.clear()
    node.outputs.clear()
    return outputs


def present(tensors: Sequence[gs.Tensor], index: int) -> gs.Tensor | None:
    """The optional input/output at `index`, or None when it is missing or empty."""
    if index < len(tensors) and tensors[index].name:
        return tensors[index]
    return None


def static_shape(tensor: gs.Tensor, what: str) -> tuple[int, ...]:
    """The tensor's shape, which the lowering needs static; ValueError (a one-line compile error) otherwise."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"cannot lower {what}: the shape of {tensor.name!r} is not static ({shape})")
    return tuple(int(d) for d in shape)
