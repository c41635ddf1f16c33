"""Lower onnxruntime-training's softmax gradients to standard ops.

Contract: each node is replaced by standard ops writing the same output tensor dX. The reduced
axes follow the forward op's opset semantics: the `_13` ops reduce over their one `axis` (default
-1), as Softmax-13 normalizes; the older `SoftmaxGrad` / `LogSoftmaxGrad` reduce over every axis
from `axis` (default 1) to the last, as Softmax-1/11 normalizes the input coerced to 2-D there.

- `SoftmaxGrad(dY, Y)`: dX = Y * (dY - ReduceSum(dY * Y, axes, keepdims=1));
- `LogSoftmaxGrad(dY, Y)` (Y the log-softmax output): dX = dY - exp(Y) * ReduceSum(dY, axes, keepdims=1).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN, Emitter
from .lowering import detach, emitter_for, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

# op -> (log-softmax?, reduces every axis from `axis` on?, default axis)
_OPS = {
    "SoftmaxGrad": (False, True, 1),
    "SoftmaxGrad_13": (False, False, -1),
    "LogSoftmaxGrad": (True, True, 1),
    "LogSoftmaxGrad_13": (True, False, -1),
}


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op in _OPS]:
        _lower(emitter_for(graph, names, node), node)
    return graph


def reduced_axes(op: str, axis: int | None, rank: int) -> list[int]:
    """The axes the softmax of `op` (one of the four gradients) normalizes over, non-negative."""
    _, to_last, default = _OPS[op]
    first = (default if axis is None else axis) % rank
    return list(range(first, rank)) if to_last else [first]


def _lower(emit: Emitter, node: gs.Node) -> None:
    grad_y, y = node.inputs[0], node.inputs[1]
    shape = static_shape(y, f"{node.op} {node.name!r}")
    axis = node.attrs.get("axis")
    axes = reduced_axes(node.op, None if axis is None else int(axis), len(shape))
    log_softmax = _OPS[node.op][0]
    (grad_x,) = detach(node)
    if log_softmax:
        total = _sum_over(emit, "sum_dy", grad_y, axes)
        probabilities = emit.op("Exp", "softmax", [y], shape)
        spread = emit.op("Mul", "softmax_sum_dy", [probabilities, total], shape)
        emit.op("Sub", "dx", [grad_y, spread], shape, into=grad_x)
    else:
        weighted = emit.op("Mul", "dy_y", [grad_y, y], shape)
        total = _sum_over(emit, "sum_dy_y", weighted, axes)
        centred = emit.op("Sub", "dy_centred", [grad_y, total], shape)
        emit.op("Mul", "dx", [y, centred], shape, into=grad_x)


def _sum_over(emit: Emitter, local: str, tensor: gs.Tensor, axes: list[int]) -> gs.Variable:
    """ReduceSum keeping dims; its axes are an attribute before opset 13 (the pre-13 gradients come
    from models of those opsets) and an input from 13 on."""
    if emit.graph.opset < 13:
        return emit.op("ReduceSum", local, [tensor], attrs={"axes": axes, "keepdims": 1})
    return emit.op("ReduceSum", local, [tensor, emit.ints(axes, f"{local}_axes")], attrs={"keepdims": 1})
