"""Give every layer its own parameter tensors.

Contract
--------
Input: any loaded model (legalize stage, no Plan yet).
Output: the same function, in which
  1. no Identity reads an initializer: each such alias (and chains of them) becomes an
     initializer of its own, a copy of the values, named like the alias's output (the exporter
     names it after the state-dict entry it stands for, e.g. `classifier.3.bias`);
  2. no float initializer feeds the state inputs (`parameters.state_slots`: weights, biases,
     BN affine and running statistics) of more than one node, directly or through a chain of
     view ops (`parameters.VIEW_OPS`): the first reader in graph order keeps the tensor, every
     other reader gets its own copy, named "<tensor>/<reader node>" (fresh by the allocator).
A graph output that is an alias stays an Identity.

Why: `torch.onnx.export` with default arguments deduplicates initializers with equal contents.
A conv bias can then be an alias of a BN running variance (so it is frozen with the statistics)
or two layers can share one tensor (so the tensor receives the sum of both layers' gradients,
and neither trains as in PyTorch). After this pass a trainable layer's tensors are its own.
Untying a model that really reuses one module twice gives each use its own copy too: the
compiler trains layers, not Python objects. Every untie is logged (`gfcompile -v`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .names import NameAllocator
from .parameters import VIEW_OPS, state_slots

STAGE: Stage = "legalize"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_LOG = pass_logger(__name__)


def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    names = NameAllocator(graph)
    aliases = _materialise_aliases(graph)
    copies = _split_shared(graph, names)
    if aliases or copies:
        _LOG.info("untied %d initializer aliases and %d shared parameter uses", aliases, copies)
    return graph


def _materialise_aliases(graph: gs.Graph) -> int:
    """Replace Identity(initializer) by a copy of the initializer under the Identity output's name."""
    outputs = {id(tensor) for tensor in graph.outputs}
    count = 0
    changed = True
    while changed:  # chains Identity(Identity(w)) resolve one link per sweep
        changed = False
        for node in graph.nodes:
            if node.op != "Identity" or not node.outputs or not isinstance(node.inputs[0], gs.Constant):
                continue
            alias = node.outputs[0]
            if id(alias) in outputs:
                continue
            source = node.inputs[0]
            copy = gs.Constant(alias.name, np.array(source.values, copy=True))
            for reader in list(alias.outputs):
                for position, tensor in enumerate(reader.inputs):
                    if tensor is alias:
                        reader.inputs[position] = copy
            node.outputs.clear()
            node.inputs.clear()
            _LOG.debug("alias %s = Identity(%s) -> its own initializer", alias.name, source.name)
            count += 1
            changed = True
    return count


def _split_shared(graph: gs.Graph, names: NameAllocator) -> int:
    count = 0
    for constant in [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]:
        if not np.issubdtype(np.asarray(constant.values).dtype, np.floating):
            continue
        for reader, position in _state_uses(graph, constant)[1:]:
            copy = gs.Constant(names.fresh(f"{constant.name}/{reader.name}"), np.array(constant.values, copy=True))
            reader.inputs[position] = copy
            _LOG.debug("shared %s: %s reads its own copy %s", constant.name, reader.name, copy.name)
            count += 1
    return count


def _state_uses(graph: gs.Graph, tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """(reader, input position) of each direct read of `tensor` that lands in a state input, in graph order."""
    readers = {id(node) for node in tensor.outputs}
    return [
        (node, position)
        for node in graph.nodes
        if id(node) in readers
        for position, read in enumerate(node.inputs)
        if read is tensor and _lands_in_state(node, position)
    ]


def _lands_in_state(reader: gs.Node, position: int) -> bool:
    """Whether input `position` of `reader` is a state input, directly or through view ops."""
    if position in state_slots(reader.op):
        return True
    if reader.op in VIEW_OPS and position == 0:
        return any(
            _lands_in_state(next_reader, next_position)
            for out in reader.outputs
            for next_reader in out.outputs
            for next_position, read in enumerate(next_reader.inputs)
            if read is out
        )
    return False
