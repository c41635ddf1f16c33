"""Lower the pooling gradients `MaxPoolGrad` and `AveragePoolGrad` (onnxruntime-training's, in the
default domain but not standard ONNX) to standard ops.

Contract:
- `MaxPoolGrad(dY, indices)`: indices are the forward MaxPool's flat positions in X (over all of
  N, C, H, W), so dX is a zero tensor of X's size with dY scatter-added at those positions
  (ScatterElements with reduction "add", opset 16+), reshaped to X's shape.
- `AveragePoolGrad(dY)`: each output spreads dY / (its window's count) uniformly over its window:
  a depthwise transposed conv with a ones kernel of dY divided by the static per-position counts
  (k_h * k_w, or the in-bounds part of the window without `count_include_pad`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .lowering import detach, emitter_for, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if (n.domain or "") in ("", "ai.onnx") and n.op == "MaxPoolGrad"]:
        _max_pool_grad(graph, names, node)
    for node in [n for n in graph.nodes if (n.domain or "") in ("", "ai.onnx") and n.op == "AveragePoolGrad"]:
        _average_pool_grad(graph, names, node)
    return graph


def _max_pool_grad(graph: gs.Graph, names: NameAllocator, node: gs.Node) -> None:
    grad_y, indices = node.inputs[0], node.inputs[1]
    pool = indices.inputs[0] if indices.inputs else None
    if pool is None or pool.op != "MaxPool":
        raise ValueError(f"cannot lower MaxPoolGrad {node.name!r}: its indices do not come from a MaxPool")
    x_shape = static_shape(pool.inputs[0], f"MaxPoolGrad {node.name!r}")
    emit = emitter_for(graph, names, node)
    (grad_x,) = detach(node)
    zeros = emit.const("zeros", np.zeros(int(np.prod(x_shape)), dtype=np.float32))
    flat_indices = emit.op("Reshape", "flat_indices", [indices, emit.ints([-1])], dtype=np.int64)
    flat_grad = emit.reshape("flat_dy", grad_y, [-1])
    scattered = emit.op(
        "ScatterElements", "scattered", [zeros, flat_indices, flat_grad], attrs={"axis": 0, "reduction": "add"}
    )
    emit.reshape("dx", scattered, list(x_shape), into=grad_x)


def _window_counts(
    out_size: tuple[int, int], in_size: tuple[int, int], kernel, strides, pads, include_pad: bool
) -> np.ndarray:
    counts = np.empty(out_size, dtype=np.float32)
    for i in range(out_size[0]):
        for j in range(out_size[1]):
            top, left = i * strides[0] - pads[0], j * strides[1] - pads[1]
            bottom, right = top + kernel[0], left + kernel[1]
            if include_pad:  # the window is clipped to the padded input only
                bottom, right = min(bottom, in_size[0] + pads[2]), min(right, in_size[1] + pads[3])
            else:
                top, left = max(top, 0), max(left, 0)
                bottom, right = min(bottom, in_size[0]), min(right, in_size[1])
            counts[i, j] = (bottom - top) * (right - left)
    return counts


def _average_pool_grad(graph: gs.Graph, names: NameAllocator, node: gs.Node) -> None:
    grad_y = node.inputs[0]
    emit = emitter_for(graph, names, node)
    (grad_x,) = detach(node)
    y_shape = static_shape(grad_y, f"AveragePoolGrad {node.name!r}")
    x_shape = static_shape(grad_x, f"AveragePoolGrad {node.name!r}")
    if len(x_shape) != 4:
        raise ValueError(f"cannot lower AveragePoolGrad {node.name!r}: only 2-D pooling is supported")
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    channels = x_shape[1]
    counts = _window_counts(y_shape[2:], x_shape[2:], kernel, strides, pads, include_pad)
    spread = emit.op("Div", "spread", [grad_y, emit.const("counts", counts)])
    output_padding = [
        x_shape[2 + a] - ((y_shape[2 + a] - 1) * strides[a] + kernel[a] - pads[a] - pads[a + 2]) for a in range(2)
    ]
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "group": channels}
    if any(output_padding):
        attrs["output_padding"] = output_padding
    ones = emit.const("ones", np.ones((channels, 1, *kernel), dtype=np.float32))
    emit.op("ConvTranspose", "dx", [spread, ones], attrs=attrs, into=grad_x)
