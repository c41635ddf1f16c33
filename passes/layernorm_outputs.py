"""Give every LayerNormalization its optional Mean and InvStdDev outputs.

Contract
--------
Input: any loaded model (legalize stage, no Plan yet).
Output: the same function; each LayerNormalization that declares fewer than three outputs
gets the missing ones as new float32 tensors (names from the allocator, read by no node).

Why: ORT 1.19's LayerNormalization gradient reads the forward node's outputs 1 and 2 (the
saved mean and inverse standard deviation). PyTorch exports LayerNorm with only `Y`, and the
gradient builder then dies on a C++ assertion (`i < node_->OutputDefs().size()`), e.g. on
ConvNeXt. Declaring the outputs changes no value: the kernel computes them anyway.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .names import NameAllocator

STAGE: Stage = "legalize"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_LOG = pass_logger(__name__)

# Output roles of LayerNormalization after Y, in the operator's order.
OPTIONAL_OUTPUTS = ("mean", "inv_std_dev")


def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    names = NameAllocator(graph)
    for node in graph.nodes:
        if node.op != "LayerNormalization" or node.domain not in ("", "ai.onnx", None):
            continue
        base = node.name or node.outputs[0].name
        declared: list[str] = []
        for position, role in enumerate(OPTIONAL_OUTPUTS, start=1):
            if position < len(node.outputs) and node.outputs[position].name:
                continue
            output = gs.Variable(names.fresh(f"{base}/{role}"), dtype=np.float32)
            if position < len(node.outputs):
                node.outputs[position] = output  # an empty (omitted) optional output
            else:
                node.outputs.append(output)
            declared.append(role)
        if declared:
            _LOG.debug("LayerNormalization %s: declared %s", node.name, ", ".join(declared))
    return graph
