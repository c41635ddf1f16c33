"""Keep a 1-byte ReLU mask for the backward instead of the fp32 ReLU output.

ORT's `ReluGrad(dY, Y)` reads the ReLU output Y, which is usually the next conv's
input. Once gradient filtering has removed that conv's full-resolution reader, the
ReluGrad is the only reason Y stays alive until the backward. Computing
`mask = Y > 0` in the forward and `Where(mask, dY, 0)` in the backward is exact and
lets ORT free Y right after the forward, keeping a bool tensor (4x smaller) instead.
Where some other backward node still reads Y, the mask would only add memory, so the
ReluGrad is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .graph_utils import gradient_dependent_nodes

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ("ort_gradient_graph",)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    backward = gradient_dependent_nodes(graph)
    zero = gs.Constant("activation_mask/zero", np.zeros((), dtype=np.float32))
    for node in [n for n in graph.nodes if n.op == "ReluGrad"]:
        grad_output, activation = node.inputs[0], node.inputs[1]
        other_backward_readers = [c for c in activation.outputs if c is not node and id(c) in backward]
        if other_backward_readers:
            continue
        mask = gs.Variable(f"{activation.name}/relu_mask", dtype=np.bool_, shape=activation.shape)
        graph.nodes.append(
            gs.Node("Greater", f"{activation.name}/relu_mask", inputs=[activation, zero], outputs=[mask])
        )
        grad_input = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.append(
            gs.Node("Where", f"{grad_input.name}/masked", inputs=[mask, grad_output, zero], outputs=[grad_input])
        )
    return graph
