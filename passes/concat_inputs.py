"""Make every tensor a Concat input of at most one Concat.

Contract
--------
Input: any loaded model (legalize stage, no Plan yet).
Output: the same function, in which no tensor is read by more than one Concat input:
  1. a Concat whose leading inputs are exactly the inputs of an earlier Concat on the same axis
     reads that Concat's output instead: DenseNet's Concat(x0, ..., xk, xk+1) becomes
     Concat(Concat(x0, ..., xk), xk+1), so each feature map enters one Concat;
  2. any read left over (several Concats, or one Concat twice) after the first in graph order
     gets its own Identity copy, named "<tensor>/concat_copy" (fresh by the allocator). Each copy
     reads the previous one: ORT's common-subexpression elimination would merge sibling
     Identities of one tensor back into a single shared read.

Why: onnxruntime-training 1.19's Concat gradient names its output for every input
"<input>_grad"; where one tensor feeds several Concats on the gradient path (seen when that
tensor itself needs no gradient), the builder fails with "Duplicate definition of name
(<tensor>_grad)". DenseNet hits it whenever the first
trained layer sits inside a dense block (a block's input feeds all its Concats). The forward
values are unchanged; nesting reuses Concats the model computes anyway.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .names import NameAllocator

STAGE: Stage = "legalize"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_LOG = pass_logger(__name__)


def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    nested = _nest_prefixes(graph)
    copies = _copy_shared_reads(graph, NameAllocator(graph))
    if nested or copies:
        _LOG.debug("nested %d Concat prefixes; gave %d Concat reads their own Identity copy", nested, copies)
    return graph


def _nest_prefixes(graph: gs.Graph) -> int:
    """Concat(a, b, c) after an earlier Concat(a, b) on the same axis becomes Concat(Concat(a, b), c)."""
    nested = 0
    seen: dict[tuple, gs.Variable] = {}  # (axis, ids of the inputs) -> an earlier Concat's output
    for node in graph.nodes:
        if node.op != "Concat" or len(node.outputs) != 1:
            continue
        axis = node.attrs.get("axis")
        original = (axis, *(id(t) for t in node.inputs))
        for length in range(len(node.inputs) - 1, 0, -1):
            earlier = seen.get((axis, *(id(t) for t in node.inputs[:length])))
            if earlier is not None:
                rest = list(node.inputs[length:])
                node.inputs.clear()
                node.inputs.extend([earlier, *rest])
                nested += 1
                break
        seen.setdefault(original, node.outputs[0])
    return nested


def _copy_shared_reads(graph: gs.Graph, names: NameAllocator) -> int:
    reads: dict[int, list[tuple[gs.Node, int]]] = {}
    tensors: dict[int, gs.Tensor] = {}
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        for position, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Variable):
                reads.setdefault(id(tensor), []).append((node, position))
                tensors[id(tensor)] = tensor
    copies = 0
    for key, tensor_reads in reads.items():
        source = tensors[key]
        # Each copy reads the previous one: ORT's common-subexpression elimination would merge
        # sibling Identities of one tensor back into a single shared read.
        for concat, position in tensor_reads[1:]:
            copy_name = names.fresh(f"{tensors[key].name}/concat_copy")
            copy = gs.Variable(copy_name, dtype=source.dtype, shape=source.shape)
            graph.nodes.append(gs.Node("Identity", name=copy_name, inputs=[source], outputs=[copy]))
            concat.inputs[position] = copy
            source = copy
            copies += 1
    return copies
