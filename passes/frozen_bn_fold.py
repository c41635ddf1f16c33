"""Fold eval-mode BatchNorm into the frozen conv before it.

A frozen conv and its BN are a fixed affine map, so one Conv with rescaled weights
computes the same output with one node and no BN tensors kept for the backward.
The folded weights get new names so they are never mistaken for the source
model's parameters.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .names import NameAllocator

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    nodes_by_name = {node.name: node for node in graph.nodes}
    names = NameAllocator(graph)
    trainable = set(plan.trainable_convs)
    for layer in plan.convs:
        if layer.node in trainable or layer.bn is None:
            continue
        conv, bn = nodes_by_name.get(layer.node), nodes_by_name.get(layer.bn)
        if conv is None or bn is None or not _all_constant(conv.inputs[1:]) or not _all_constant(bn.inputs[1:]):
            continue
        weight = conv.inputs[1].values.astype(np.float64)
        bias = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
        gamma, beta, mean, var = (tensor.values.astype(np.float64) for tensor in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        folded_weight = (weight * scale[:, None, None, None]).astype(np.float32)
        folded_bias = ((bias - mean) * scale + beta).astype(np.float32)
        conv.inputs = [
            conv.inputs[0],
            gs.Constant(names.fresh(f"{conv.inputs[1].name}.bnfolded"), folded_weight),
            gs.Constant(names.fresh(f"{conv.inputs[1].name}.bnfolded_bias"), folded_bias),
        ]
        bn_output = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs = [bn_output]
    return graph


def _all_constant(tensors) -> bool:
    return all(isinstance(tensor, gs.Constant) for tensor in tensors)
