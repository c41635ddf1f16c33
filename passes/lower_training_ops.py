"""Lower onnxruntime-training's small utility ops to standard ONNX ops.

Contract: each node below is replaced by standard ops that compute the same values into the same
output tensors (same names, same readers):

- `ReluGrad(dY, X)`: Where(X > 0, dY, 0).
- `Scale(x, s)`: x * s, or x / s with `scale_down`.
- `FusedMatMul(A, B)`: MatMul of the (optionally transposed) operands, times alpha.
- `PassThrough(x_1..x_k)`: k Identity nodes. ORT's PassThrough only aliased its inputs to order
  the forward (see save_early); plain ORT removes Identity nodes, so that ordering is not kept.
- `ConcatTraining(x_1..x_k)`: Concat, plus the constant per-input lengths along the axis.
- `SplitTraining(x, split)`: Split.
- `InPlaceAccumulatorV2(buffer, grad, reset)`: a pure training step does not accumulate across
  calls, so the accumulator's output (`lowering.gradient_output_name`) becomes `grad` itself, with
  the buffer's dtype and shape, and the graph inputs `buffer` and `reset` are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN, Emitter
from .lowering import detach, emitter_for, present, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    lowerings = {
        "ReluGrad": _relu_grad,
        "Scale": _scale,
        "FusedMatMul": _fused_matmul,
        "PassThrough": _pass_through,
        "ConcatTraining": _concat_training,
        "SplitTraining": _split_training,
        "InPlaceAccumulatorV2": _accumulator,
    }
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op in lowerings]:
        emit = emitter_for(graph, names, node)
        lowerings[node.op](emit, node)
    read = {id(t) for n in graph.nodes for t in n.inputs}
    returned = {id(t) for t in graph.outputs}
    graph.inputs = [t for t in graph.inputs if id(t) in read or id(t) in returned]
    return graph


def _relu_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, x = node.inputs[0], node.inputs[1]
    (grad_x,) = detach(node)
    zero = emit.const("zero", np.zeros((), dtype=np.float32))
    positive = emit.op("Greater", "positive", [x, zero], dtype=np.bool_)
    emit.op("Where", "dx", [positive, grad_y, zero], into=grad_x)


def _scale(emit: Emitter, node: gs.Node) -> None:
    x, scale = node.inputs[0], node.inputs[1]
    scale_down = bool(node.attrs.get("scale_down", 0))
    (out,) = detach(node)
    if isinstance(scale, gs.Constant):
        scale = emit.const("scale", np.asarray(scale.values, dtype=np.float32))
    else:  # ORT's Scale takes a scale of any numeric type for a float input
        scale = emit.op("Cast", "scale", [scale], attrs={"to": onnx.TensorProto.FLOAT})
    emit.op("Div" if scale_down else "Mul", "scaled", [x, scale], into=out)


def _fused_matmul(emit: Emitter, node: gs.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    attrs = node.attrs
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise ValueError(f"cannot lower FusedMatMul {node.name!r}: transBatchA/transBatchB are not supported")
    (out,) = detach(node)
    if attrs.get("transA", 0):
        a = _swap_last_axes(emit, "a_t", a, node)
    if attrs.get("transB", 0):
        b = _swap_last_axes(emit, "b_t", b, node)
    alpha = float(attrs.get("alpha", 1.0))
    if alpha == 1.0:
        emit.op("MatMul", "product", [a, b], into=out)
    else:
        product = emit.op("MatMul", "product", [a, b])
        emit.op("Mul", "scaled", [product, emit.const("alpha", np.array(alpha, np.float32))], into=out)


def _swap_last_axes(emit: Emitter, local: str, tensor: gs.Tensor, node: gs.Node) -> gs.Variable:
    rank = len(static_shape(tensor, f"FusedMatMul {node.name!r}"))
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return emit.op("Transpose", local, [tensor], attrs={"perm": perm})


def _pass_through(emit: Emitter, node: gs.Node) -> None:
    sources = list(node.inputs)
    outputs = detach(node)
    for index, (source, out) in enumerate(zip(sources, outputs, strict=True)):
        if out is not None:
            emit.op("Identity", f"alias_{index}", [source], into=out)


def _concat_training(emit: Emitter, node: gs.Node) -> None:
    parts = list(node.inputs)
    axis = int(node.attrs.get("axis", 0))
    outputs = detach(node)
    emit.op("Concat", "concat", parts, attrs={"axis": axis}, into=outputs[0])
    lengths = present(outputs, 1) if len(outputs) > 1 else None
    if lengths is not None:
        sizes = [static_shape(p, f"ConcatTraining {node.name!r}")[axis] for p in parts]
        emit.op("Identity", "lengths", [emit.ints(sizes, "lengths_values")], dtype=np.int64, into=lengths)


def _split_training(emit: Emitter, node: gs.Node) -> None:
    source, split = node.inputs[0], present(node.inputs, 1)
    axis = int(node.attrs.get("axis", 0))
    outputs = [out if out is not None else gs.Variable(emit.name(f"unused_{i}")) for i, out in enumerate(detach(node))]
    split_node = gs.Node("Split", name=emit.name("split"), attrs={"axis": axis})
    split_node.inputs = [source] + ([split] if split is not None else [])
    split_node.outputs = outputs
    emit.graph.nodes.append(split_node)


def _accumulator(emit: Emitter, node: gs.Node) -> None:
    buffer, grad = node.inputs[0], node.inputs[1]
    out = detach(node)[0]
    if out is None:
        return
    out.dtype, out.shape = buffer.dtype, buffer.shape
    emit.op("Identity", "gradient", [grad], into=out)
