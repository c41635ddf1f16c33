"""Lower onnxruntime-training's indexing gradients `GatherGrad` and `SliceGrad` to standard ops.

Contract: each node is replaced by standard ops writing the same output tensor dX, a tensor of the
forward input's (static) shape that is zero except where the forward read it:

- `GatherGrad(shape, indices, dY)` (attribute `axis`): dX[..., i, ...] is the sum of dY[..., j, ...]
  over every position j whose index is i (negative indices count from the back), so an index
  repeated k times ACCUMULATES k gradients. With constant indices and a small one-hot matrix
  (D x J at most `ONE_HOT_LIMIT` elements, D the axis length and J the number of indices), dX is one
  MatMul of that constant matrix's transpose with dY viewed as (before, J, after); otherwise a
  ScatterND with reduction "add" into zeros, on transposed views that put the gathered axis first.
- `SliceGrad(dY, shape, starts, ends[, axes[, steps]])`: starts, ends, axes and steps must be
  constants; they are resolved with numpy's slicing rules, which ONNX Slice follows (clamping,
  negative starts/ends, negative steps). Each sliced axis places its rows back at the positions it
  read: a Pad where those are one ascending run (step 1), else a constant 0/1 placement MatMul
  along that axis (a slice reads each position at most once, so nothing accumulates).

Refusals (ValueError, a one-line compile error naming the node): a non-constant slice parameter, or
a forward shape that is not static.
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

# Largest constant one-hot (or placement) matrix, in elements, that the lowering builds (4 MiB of float32).
ONE_HOT_LIMIT = 1 << 20


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    lowerings = {"GatherGrad": _gather_grad, "SliceGrad": _slice_grad}
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op in lowerings]:
        lowerings[node.op](emitter_for(graph, names, node), node)
    return graph


def constant_values(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of an initializer or of a Constant node's output; None for anything computed."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    if producer is not None and producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
        return np.asarray(producer.attrs["value"].values)
    return None


def _forward_shape(shape_input: gs.Tensor, node: gs.Node) -> tuple[int, ...]:
    """The forward input's shape: a constant, or Shape(X) of an X with a static shape."""
    values = constant_values(shape_input)
    if values is not None:
        return tuple(int(v) for v in values.reshape(-1))
    producer = shape_input.inputs[0] if shape_input.inputs else None
    if producer is not None and producer.op == "Shape":
        dims = static_shape(producer.inputs[0], f"{node.op} {node.name!r}")
        # Shape-15's start/end select dims as a Python slice does (negative and clamped alike).
        return dims[int(producer.attrs.get("start", 0)) : producer.attrs.get("end")]
    raise ValueError(f"cannot lower {node.op} {node.name!r}: the forward input's shape is not static")


def _gather_grad(emit: Emitter, node: gs.Node) -> None:
    shape_input, indices, grad_y = node.inputs[0], node.inputs[1], node.inputs[2]
    x_shape = _forward_shape(shape_input, node)
    axis = int(node.attrs.get("axis", 0)) % len(x_shape)
    (grad_x,) = detach(node)
    depth = x_shape[axis]
    constant = constant_values(indices)
    count = int(np.prod(constant.shape)) if constant is not None else 0
    if constant is not None and depth * count <= ONE_HOT_LIMIT:
        one_hot = np.zeros((depth, count), dtype=np.float32)
        np.add.at(one_hot, (np.mod(constant.reshape(-1), depth), np.arange(count)), 1.0)
        _place_along_axis(emit, grad_y, one_hot, x_shape, axis, "one_hot", into=grad_x)
    else:
        index_shape = static_shape(indices, f"GatherGrad {node.name!r}")
        _scatter_add_along_axis(emit, grad_y, indices, index_shape, x_shape, axis, grad_x)


def _place_along_axis(
    emit: Emitter,
    source: gs.Tensor,
    matrix: np.ndarray,
    out_shape: tuple[int, ...],
    axis: int,
    tag: str,
    into: gs.Variable | None = None,
) -> gs.Variable:
    """out[..., i, ...] = sum over j of matrix[i, j] * source[..., j, ...] along `axis`: one MatMul of
    the constant (D, J) matrix with `source` viewed as (before, J, after)."""
    before, after = int(np.prod(out_shape[:axis])), int(np.prod(out_shape[axis + 1 :]))
    depth, count = matrix.shape
    rows = emit.reshape(f"{tag}_rows", source, (before, count, after))
    placed = emit.op("MatMul", f"{tag}_placed", [emit.const(f"{tag}_matrix", matrix), rows], (before, depth, after))
    return emit.reshape(f"{tag}_out", placed, list(out_shape), into=into)


def _scatter_add_along_axis(
    emit: Emitter,
    grad_y: gs.Tensor,
    indices: gs.Tensor,
    index_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    axis: int,
    into: gs.Variable,
) -> None:
    """ScatterND(reduction="add") of dY into zeros along `axis`, on views with that axis first."""
    rank, q = len(x_shape), len(index_shape)
    rest = [*x_shape[:axis], *x_shape[axis + 1 :]]
    # dY is x_shape[:axis] + index_shape + x_shape[axis+1:]; bring the index dims to the front.
    to_front = [*range(axis, axis + q), *range(axis), *range(axis + q, rank - 1 + q)]
    updates = emit.op("Transpose", "dy_index_first", [grad_y], [*index_shape, *rest], attrs={"perm": to_front})
    depth = emit.const("depth", np.array(x_shape[axis], dtype=np.int64))
    wide = emit.op(
        "Cast", "indices_i64", [indices], list(index_shape), dtype=np.int64, attrs={"to": onnx.TensorProto.INT64}
    )
    wrapped = emit.op("Mod", "indices_wrapped", [wide, depth], list(index_shape), dtype=np.int64)
    positions = emit.op("Unsqueeze", "positions", [wrapped, emit.ints([-1])], [*index_shape, 1], dtype=np.int64)
    zeros = emit.op(
        "ConstantOfShape",
        "zeros",
        [emit.ints([x_shape[axis], *rest], "zeros_shape")],
        [x_shape[axis], *rest],
        attrs={"value": gs.Constant(emit.name("zero_value"), np.zeros(1, dtype=np.float32))},
    )
    summed = emit.op(
        "ScatterND", "summed", [zeros, positions, updates], [x_shape[axis], *rest], attrs={"reduction": "add"}
    )
    back = [*range(1, axis + 1), 0, *range(axis + 1, rank)]
    emit.op("Transpose", "dx", [summed], list(x_shape), attrs={"perm": back}, into=into)


def _slice_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, shape_input = node.inputs[0], node.inputs[1]
    x_shape = _forward_shape(shape_input, node)
    rank = len(x_shape)
    params = {}
    for index, label in ((2, "starts"), (3, "ends"), (4, "axes"), (5, "steps")):
        tensor = present(node.inputs, index)
        values = constant_values(tensor) if tensor is not None else None
        if tensor is not None and values is None:
            raise ValueError(f"cannot lower SliceGrad {node.name!r}: its {label} are not constant")
        params[label] = None if values is None else [int(v) for v in values.reshape(-1)]
    axes = params["axes"] if params["axes"] is not None else list(range(len(params["starts"])))
    steps = params["steps"] if params["steps"] is not None else [1] * len(axes)
    (grad_x,) = detach(node)

    # Per axis, the positions of X that the slice read, in the order it read them.
    read = {a: np.arange(d) for a, d in enumerate(x_shape)}
    for axis, start, end, step in zip(axes, params["starts"], params["ends"], steps, strict=True):
        axis %= rank
        read[axis] = np.arange(x_shape[axis])[slice(start, end, step)]
    current = grad_y
    pads_begin, pads_end = [0] * rank, [0] * rank
    shape = [len(read[a]) for a in range(rank)]
    for axis in range(rank):
        positions = read[axis]
        if np.array_equal(positions, np.arange(x_shape[axis])):
            continue  # not sliced, or read whole and in order
        if len(positions) == 0 or np.all(np.diff(positions) == 1):
            first = int(positions[0]) if len(positions) else 0
            pads_begin[axis], pads_end[axis] = first, x_shape[axis] - first - len(positions)
            continue
        placement = np.zeros((x_shape[axis], len(positions)), dtype=np.float32)
        placement[positions, np.arange(len(positions))] = 1.0
        shape[axis] = x_shape[axis]
        current = _place_along_axis(emit, current, placement, tuple(shape), axis, f"axis{axis}")
    if any(pads_begin) or any(pads_end):
        emit.op("Pad", "dx", [current, emit.ints(pads_begin + pads_end, "pads")], list(x_shape), into=grad_x)
    else:
        emit.op("Identity", "dx", [current], list(x_shape), into=grad_x)
