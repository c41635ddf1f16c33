"""Lower onnxruntime-training's small utility ops to standard ONNX ops.

Contract: each node below is replaced by standard ops that compute the same values into the same
output tensors (same names, same readers):

- `ReluGrad(dY, X)`: Where(X > 0, dY, 0).
- `Scale(x, s)`: x * s, or x / s with `scale_down`.
- `FusedMatMul(A, B)`: MatMul of the (optionally transposed) operands, times alpha.
- `PassThrough(x, s_1..s_k)`: save_early's barrier, which makes x's forward readers wait for the
  summaries s_i (see save_early). Separate Identity nodes would lose that ordering (no Identity
  reads the s_i, and ORT removes Identity nodes anyway); so x's alias is `Reshape(x, shape + z)`,
  where z is an int64 0 summed over an empty slice of every s_i. The Reshape aliases x (no copy),
  the shape stays x's static shape, z is exactly 0 whatever the s_i hold (no element is read, so
  not even a NaN reaches it), and ORT folds none of it: z is not a constant. The s_i's aliases are
  Identity nodes. Measured by `benchmarks.portable_order`.
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
# Local name of the Reshape that carries a lowered PassThrough's ordering (its node is "<scope>/ordered").
ORDERED_ALIAS = "ordered"


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
    source, *summaries = node.inputs
    source_alias, *summary_aliases = detach(node)
    for index, (summary, out) in enumerate(zip(summaries, summary_aliases, strict=True), start=1):
        if out is not None:
            emit.op("Identity", f"alias_{index}", [summary], into=out)
    if source_alias is None:
        return
    if not summaries:
        emit.op("Identity", "alias_0", [source], into=source_alias)
        return
    shape = static_shape(source, f"PassThrough {node.name!r}")
    zero = None
    for index, summary in enumerate(summaries, start=1):
        term = _zero_read_from(emit, index, summary)
        zero = term if zero is None else emit.op("Add", f"zero_upto_{index}", [zero, term], (), dtype=np.int64)
    ordered_shape = emit.op("Add", "ordered_shape", [emit.ints(shape), zero], (len(shape),), dtype=np.int64)
    emit.op("Reshape", ORDERED_ALIAS, [source, ordered_shape], into=source_alias)


def _zero_read_from(emit: Emitter, index: int, tensor: gs.Tensor) -> gs.Variable:
    """An int64 scalar 0 that only a node run after `tensor` can produce: the sum of an empty slice of it."""
    known = tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)
    size = (int(np.prod(tensor.shape, dtype=np.int64)),) if known else None
    flat = emit.op("Reshape", f"flat_{index}", [tensor, emit.ints([-1])], size, dtype=tensor.dtype)
    empty = emit.op("Slice", f"empty_{index}", [flat, emit.ints([0]), emit.ints([0])], (0,), dtype=tensor.dtype)
    count = emit.op("Cast", f"empty_i64_{index}", [empty], (0,), dtype=np.int64, attrs={"to": onnx.TensorProto.INT64})
    return emit.op("ReduceSum", f"zero_{index}", [count], (), dtype=np.int64, attrs={"keepdims": 0})


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
