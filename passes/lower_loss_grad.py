"""Lower com.microsoft `SoftmaxCrossEntropyLossGrad` (and its `...InternalGrad` twin) to standard ops.

Contract: the gradient of softmax cross-entropy w.r.t. the logits, into the same output tensor:

    d_logits[n, c, ...] = (exp(log_prob[n, c, ...]) - [label[n, ...] == c]) * w[n, ...] * scale

where w is weight[label] (1 without a weight input) and 0 where the label is `ignore_index`, and
scale is dY for reduction "sum" or "none" (per element), and dY / sum(w) for "mean", with an
all-ignored batch left unscaled (its gradient is zero anyway), as ORT's CPU kernel does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN
from .lowering import detach, emitter_for, present, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_GRAD_OPS = ("SoftmaxCrossEntropyLossGrad", "SoftmaxCrossEntropyLossInternalGrad")
# ORT's kernels ignore this label when the node has no ignore_index.
_DEFAULT_IGNORE_INDEX = -1


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op in _GRAD_OPS]:
        _lower(graph, names, node)
    return graph


def _lower(graph: gs.Graph, names: NameAllocator, node: gs.Node) -> None:
    grad_loss, log_prob, label = node.inputs[0], node.inputs[1], node.inputs[2]
    weight = present(node.inputs, 3)
    ignore_tensor = present(node.inputs, 4)
    if present(node.inputs, 5) is not None:
        raise ValueError(f"cannot lower {node.op} {node.name!r}: the bias input is not supported")
    reduction = node.attrs.get("reduction", "mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cannot lower {node.op} {node.name!r}: unknown reduction {reduction!r}")
    classes = static_shape(log_prob, f"{node.op} {node.name!r}")[1]
    emit = emitter_for(graph, names, node)
    (grad_logits,) = detach(node)

    label = emit.op("Cast", "label", [label], dtype=np.int64, attrs={"to": onnx.TensorProto.INT64})
    if ignore_tensor is not None:
        ignore = emit.op("Cast", "ignore_index", [ignore_tensor], dtype=np.int64, attrs={"to": onnx.TensorProto.INT64})
    else:
        ignore = emit.const("ignore_index", np.array(node.attrs.get("ignore_index", _DEFAULT_IGNORE_INDEX), np.int64))
    ignored = emit.op("Equal", "ignored", [label, ignore], dtype=np.bool_)
    safe_label = emit.op(
        "Where", "safe_label", [ignored, emit.const("label_zero", np.array(0, np.int64)), label], dtype=np.int64
    )
    depth = emit.const("depth", np.array(classes, np.int64))
    one_hot = emit.op(
        "OneHot", "one_hot", [safe_label, depth, emit.const("off_on", np.array([0, 1], np.float32))], attrs={"axis": 1}
    )
    difference = emit.op("Sub", "difference", [emit.op("Exp", "probability", [log_prob]), one_hot])

    zero = emit.const("zero", np.array(0, np.float32))
    one = emit.const("one", np.array(1, np.float32))
    kept = one if weight is None else emit.op("Gather", "label_weight", [weight, safe_label])
    row_weight = emit.op("Where", "row_weight", [ignored, zero, kept])
    if reduction == "mean":
        total = emit.op("ReduceSum", "total_weight", [row_weight], attrs={"keepdims": 0})
        empty = emit.op("Equal", "empty", [total, zero], dtype=np.bool_)
        divisor = emit.op("Where", "divisor", [empty, one, total])
        factor = emit.op("Mul", "factor", [row_weight, emit.op("Div", "scale", [grad_loss, divisor])])
    else:
        factor = emit.op("Mul", "factor", [row_weight, grad_loss])
    factor = emit.op("Unsqueeze", "factor_c", [factor, emit.ints([1])])
    emit.op("Mul", "d_logits", [difference, factor], into=grad_logits)
