"""Compute the small tensors saved for the backward before the full-resolution tensor they summarise is used.

Gradient filtering keeps x~ (the sum-pooled input of a filtered conv) instead of x, and
`activation_mask` keeps a bool ReLU mask instead of the fp32 activation. That only saves
memory if x~ and the mask are computed while x is still in use by the forward. ORT 1.19's
default execution order is a reverse depth-first walk from the graph's leaves that
emits a node when its first reader needs it; x~ and the masks are read only by the
backward, so they were emitted in the middle of the backward and held x alive through
it (measured on DeepLabV3-ResNet-18 at 512², batch 8: the filtered build peaked 1.27x
above the exact one, the 160 MiB ASPP concat output living into the backward).

For each such x this pass inserts one `com.microsoft.PassThrough(x, s_1, ..., s_k)`: it
returns its inputs as aliases (no copy; ORT checks that the buffers are shared), and
every other reader of x reads its first output, every backward reader of s_i its
(i+1)-th. Then x's forward readers depend on the summaries, so any topological order
computes them first, and x is freed after its last forward reader as in plain inference.
Values are untouched. Tensors ORT cannot alias (graph inputs, initializers) are left alone.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .emitter import MS_DOMAIN
from .graph_utils import gradient_dependent_nodes
from .names import X_POOL, NameAllocator

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ("gradient_filter", "activation_mask")
FACTS: tuple[str, ...] = ("ort_gradient_graph",)

_LOG = pass_logger(__name__)
# A summary computed from x by more nodes than this is not one of the pooling / mask chains.
_MAX_CHAIN = 16


def barrier_name(source: str) -> str:
    """Preferred name of the PassThrough node that orders the summaries of `source` before its readers."""
    return f"{source}/save_early"


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Insert one aliasing PassThrough per summarised forward tensor (see the module docstring)."""
    tensors = graph.tensors()
    backward = gradient_dependent_nodes(graph)
    inputs = {t.name for t in graph.inputs}
    candidates: list[tuple[str, str]] = []
    for conv in plan.filtered:
        pooled = plan.generated.filter_tensor(conv, X_POOL)
        if pooled is not None:
            candidates.append((plan.conv(conv).input, pooled))
    candidates += list(plan.generated.relu_masks.items())
    groups: dict[str, list[tuple[gs.Variable, set[int]]]] = {}
    for source_name, summary_name in candidates:
        source, summary = tensors.get(source_name), tensors.get(summary_name)
        if not isinstance(source, gs.Variable) or not isinstance(summary, gs.Variable):
            continue
        if source.name in inputs or not source.inputs or summary in graph.outputs:
            continue  # ORT cannot alias a graph input; a graph output must keep its producer
        chain = _chain(summary, source, backward)
        if chain is None:
            _LOG.debug("%s is not computed from %s alone; left alone", summary.name, source.name)
            continue
        group = groups.setdefault(source.name, [])
        if all(existing is not summary for existing, _ in group):
            group.append((summary, chain))
    names = NameAllocator(graph)
    for source_name, group in groups.items():
        _insert_barrier(graph, names, tensors[source_name], group)
    graph.cleanup().toposort()
    return graph


def _chain(summary: gs.Variable, source: gs.Variable, backward: set[int]) -> set[int] | None:
    """ids of the forward nodes between `source` and `summary`, if `summary` depends on nothing else variable."""
    chain: set[int] = set()
    reaches_source = False
    frontier = [summary]
    while frontier:
        tensor = frontier.pop()
        if tensor is source:
            reaches_source = True
            continue
        if isinstance(tensor, gs.Constant) or not tensor.name:
            continue
        if len(tensor.inputs) != 1:
            return None  # another graph input or an unproduced variable feeds the summary
        node = tensor.inputs[0]
        if id(node) in backward:
            return None
        if id(node) in chain:
            continue
        chain.add(id(node))
        if len(chain) > _MAX_CHAIN:
            return None
        frontier.extend(node.inputs)
    return chain if reaches_source else None


def _alias(names: NameAllocator, tensor: gs.Variable, suffix: str) -> gs.Variable:
    return gs.Variable(names.fresh(f"{tensor.name}/{suffix}"), dtype=tensor.dtype, shape=tensor.shape)


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def _insert_barrier(
    graph: gs.Graph, names: NameAllocator, source: gs.Variable, group: list[tuple[gs.Variable, set[int]]]
) -> None:
    in_chain = set().union(*(chain for _, chain in group))
    readers = [node for node in source.outputs if id(node) not in in_chain]
    if not readers:
        return  # only the summaries read x: it dies with them already
    source_alias = _alias(names, source, "saved_after")
    summary_aliases = [_alias(names, summary, "saved") for summary, _ in group]
    summary_readers = [list(summary.outputs) for summary, _ in group]
    for node in readers:
        _replace_input(node, source, source_alias)
    for (summary, _), alias, users in zip(group, summary_aliases, summary_readers, strict=True):
        for node in users:
            _replace_input(node, summary, alias)
    graph.nodes.append(
        gs.Node(
            "PassThrough",
            names.fresh(barrier_name(source.name)),
            inputs=[source, *(summary for summary, _ in group)],
            outputs=[source_alias, *summary_aliases],
            domain=MS_DOMAIN,
        )
    )
    _LOG.info("%s computed before the readers of %s", ", ".join(s.name for s, _ in group), source.name)


__all__ = ["FACTS", "REQUIRES", "STAGE", "barrier_name", "run"]
