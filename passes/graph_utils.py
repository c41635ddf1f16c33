"""Graph queries that several passes need. Not a pass: it rewrites nothing."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .names import GRADIENT_SUFFIX


def gradient_dependent_nodes(graph: gs.Graph) -> set[int]:
    """ids of the nodes that (transitively) read a gradient tensor: the backward part of the graph.

    Going by data rather than by node name also classifies nodes that training passes added
    (activation_mask's `Where`, gradient_filter's ops) correctly.
    """
    backward: set[int] = set()
    frontier = [tensor for name, tensor in graph.tensors().items() if name.endswith(GRADIENT_SUFFIX)]
    seen: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for consumer in tensor.outputs:
            if id(consumer) not in backward:
                backward.add(id(consumer))
                frontier.extend(consumer.outputs)
    return backward
