"""Dead-node removal and constant folding that never bakes in a trainable parameter.

Folding `Mul(gamma, inv_std)` into a constant would silently freeze gamma, so the
trainable parameters are hidden as graph inputs while onnx-graphsurgeon folds, then
restored as initializers with their original values.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Plan, Stage

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ("static_shapes",)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    tensors = graph.tensors()
    shielded: dict[str, gs.Tensor] = {}
    values = {}
    for name in plan.trainable_params:
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Constant):
            values[name] = tensor.values
            shielded[name] = tensor
            tensor.to_variable(dtype=tensor.values.dtype, shape=list(tensor.values.shape))
            graph.inputs.append(tensor)
    graph.fold_constants(error_ok=False).cleanup()
    graph.inputs = [tensor for tensor in graph.inputs if tensor.name not in shielded]
    for name, tensor in shielded.items():
        tensor.to_constant(values[name])
    return graph.cleanup().toposort()
