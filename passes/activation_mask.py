"""Keep 1-byte activation masks for the backward instead of fp32 tensors.

ORT's `ReluGrad(dY, Y)` reads the ReLU output Y, which is usually the next conv's
input. Once gradient filtering has removed that conv's full-resolution reader, the
ReluGrad is the only reason Y stays alive until the backward. Computing
`mask = Y > 0` in the forward and `Where(mask, dY, 0)` in the backward is exact and
lets ORT free Y right after the forward, keeping a bool tensor (4x smaller) instead.
Where some other backward node still reads Y, the mask would only add memory, so the
ReluGrad is left alone.

ORT differentiates Clip (ReLU6) as `Mul(dY, Cast(And(x >= min, x <= max), float))`, and the
float cast of the mask is what it keeps from the forward: as large as the activation. Feeding the
bool mask to a `Where` instead keeps a quarter of that, with the same result.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .graph_utils import gradient_dependent_nodes
from .names import NameAllocator, preferred_mask_name

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ("gradient_filter",)
FACTS: tuple[str, ...] = ("ort_gradient_graph",)

_LOG = pass_logger(__name__)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Replace every ReluGrad whose activation nothing else in the backward reads; publish the masks."""
    backward = gradient_dependent_nodes(graph)
    names = NameAllocator(graph)
    zero = gs.Constant(names.fresh("activation_mask/zero"), np.zeros((), dtype=np.float32))
    for node in [n for n in graph.nodes if n.op == "ReluGrad"]:
        grad_output, activation = node.inputs[0], node.inputs[1]
        other_backward_readers = [c for c in activation.outputs if c is not node and id(c) in backward]
        if other_backward_readers:
            _LOG.debug(
                "%s is also read by %s; ReluGrad left alone",
                activation.name,
                ", ".join(c.name for c in other_backward_readers),
            )
            continue
        mask_name = names.fresh(preferred_mask_name(activation.name))
        mask = gs.Variable(mask_name, dtype=np.bool_, shape=activation.shape)
        graph.nodes.append(gs.Node("Greater", mask_name, inputs=[activation, zero], outputs=[mask]))
        plan.generated.relu_masks[activation.name] = mask_name
        grad_input = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        where = names.fresh(f"{grad_input.name}/masked")
        graph.nodes.append(gs.Node("Where", where, inputs=[mask, grad_output, zero], outputs=[grad_input]))
    _bool_masks_instead_of_float(graph, backward, zero, names)
    return graph


# Ops whose output is a bool tensor even where shape inference left the dtype unset.
_BOOL_PRODUCERS = {"And", "Or", "Not", "Xor", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"}


def _bool_masks_instead_of_float(graph: gs.Graph, backward: set[int], zero: gs.Constant, names: NameAllocator) -> None:
    for cast in [n for n in graph.nodes if n.op == "Cast" and id(n) not in backward]:
        mask = cast.inputs[0]
        is_bool = mask.dtype == np.bool_ or (mask.inputs and mask.inputs[0].op in _BOOL_PRODUCERS)
        if not is_bool or cast.attrs.get("to") != onnx.TensorProto.FLOAT:
            continue
        users = list(cast.outputs[0].outputs)
        if not users or any(user.op != "Mul" or id(user) not in backward for user in users):
            continue
        for mul in users:
            grad = mul.inputs[0] if mul.inputs[1] is cast.outputs[0] else mul.inputs[1]
            product = mul.outputs[0]
            mul.inputs.clear()
            mul.outputs.clear()
            where = names.fresh(f"{product.name}/masked")
            graph.nodes.append(gs.Node("Where", where, inputs=[mask, grad, zero], outputs=[product]))
