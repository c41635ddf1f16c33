"""Row-centric backward for row-tiled chains (LR-CNN), a training-graph rewrite. Exact.

`row_tiling` (forward stage) splits conv chains into row bands; ORT's gradient builder then
back-propagates every band, which keeps every band's activations alive from the forward to
the backward: as much memory as the untiled chain. This pass makes the backward
row-centric too:

* Recompute. For every band of a tiled chain whose activations a gradient node reads, the
  band's forward nodes are duplicated and the band's gradient nodes are rewired to the
  copies. The originals then die during the forward; only the chain's entry (the band
  boundary every band is sliced from) and exit stay alive. A data edge (an empty tensor
  concatenated into the copy's Slice `starts`, see row_tiling._entry_rows) makes the copy
  wait for the band's incoming gradient and for the complete backward of the band after it,
  so any topological order, ORT's default reverse DFS included, recomputes and
  back-propagates one band at a time, last band first.
  2PS bands: a band's copy starts from the rows the previous band handed over in the
  forward (its `carry` Slices are not copied), so those small tensors stay alive until the
  backward and the recomputed rows equal the forward's. The gradient of a handed-over row
  reaches band j from band j+1's backward, which already runs first.
* Weight gradients. ORT sums the per-band gradients of a shared weight with one `Sum`
  node, which keeps all K partial gradients alive until the last band is done; it becomes
  a chain of Adds in band order, so each partial gradient dies once added.
* Entry gradient. ORT turns each band's entry Slice into a SliceGrad (a full-size,
  zero-padded copy of the entry) and sums the K of them: K full-size tensors. Instead, the
  band gradients are sliced into the row segments between band borders, the overlapping
  (halo) segments are added, and the segments are concatenated: one full-size tensor.
  (2PS entry Slices start at a constant concatenated with an empty ordering edge.)
* MaxPool indices. ORT's gradient builder gives every MaxPool an indices output (int64,
  twice the bytes of the pooled tensor) and ORT keeps an output nobody reads until the end
  of the step; for a VGG-16 at batch 8 that is 95 MiB of frozen-layer indices, more than
  the tiled frozen layers use. Unread indices outputs are dropped (for tiled or not).

Bands are found by name: row_tiling names band nodes `<chain scope>/band<j>/...` under the
chain scopes it published (`plan.generated.chain_scopes`, see `passes.names`), and ORT names a
gradient node after its forward node (`<forward name>_Grad/...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .emitter import MS_DOMAIN, Emitter
from .graph_utils import gradient_dependent_nodes
from .names import (
    ENTRY,
    GRADIENT_NODE_MARK,
    GRADIENT_SUFFIX,
    RECOMPUTE_SCOPE,
    RECOMPUTED,
    NameAllocator,
    band_scope,
    parse_band,
    scoped,
)

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ("row_tiling",)
FACTS: tuple[str, ...] = ("ort_gradient_graph",)

_LOG = pass_logger(__name__)


@dataclass
class _Band:
    """One band of one tiled chain in the training graph."""

    chain: str
    index: int
    scope: str  # the band's node-name scope
    forward: list[gs.Node] = field(default_factory=list)  # the band's forward nodes, graph order
    backward: list[gs.Node] = field(default_factory=list)  # ORT's gradient nodes of those

    @property
    def entry(self) -> str:
        """Name of the band's Slice of the chain entry (ORT's gradient of it starts with it too)."""
        return scoped(self.scope, ENTRY)


def tiled_bands(graph: gs.Graph, chain_scopes: dict[str, str]) -> dict[str, dict[int, _Band]]:
    """Chain name -> band index -> its forward and gradient nodes, for the chains of `chain_scopes`."""
    backward = gradient_dependent_nodes(graph)
    chains: dict[str, dict[int, _Band]] = {}
    for node in graph.nodes:
        where = parse_band(node.name or "", chain_scopes)
        if where is None:
            continue
        scope = band_scope(chain_scopes[where.chain], where.band)
        band = chains.setdefault(where.chain, {}).setdefault(where.band, _Band(where.chain, where.band, scope))
        (band.backward if id(node) in backward else band.forward).append(node)
    return chains


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Recompute trainable bands inside the backward; drop unread MaxPool indices."""
    if graph.opset < 13:
        raise ValueError(f"row recompute needs opset >= 13 (Slice/Concat with tensor inputs), got {graph.opset}")
    chain_scopes = plan.generated.chain_scopes
    node_names = {node.name for node in graph.nodes}
    names = NameAllocator(graph)
    for chain, bands in tiled_bands(graph, chain_scopes).items():
        if plan.generated.recompute_markers.get(chain) in node_names:
            # Already rewritten (the pass ran before): copying the copies would give clones
            # without ordering edges that ORT's common-subexpression elimination merges back
            # into the forward originals, which then stay alive until the backward.
            _LOG.debug("%s: already recomputed band by band", chain)
            continue
        if not any(band.backward for band in bands.values()):
            _LOG.debug("%s: frozen (no gradient flows through its bands); nothing to recompute", chain)
            continue
        marker = _recompute_chain(graph, names, chain_scopes[chain], bands)
        if marker is not None:
            plan.generated.recompute_markers[chain] = marker
        _LOG.info("%s: %d bands recomputed in the backward", chain, len(bands))
    dropped = drop_unread_pool_indices(graph)
    if dropped:
        _LOG.info("dropped %d unread MaxPool indices outputs", dropped)
    graph.cleanup()
    return graph


def drop_unread_pool_indices(graph: gs.Graph) -> int:
    """Remove the indices output of MaxPool nodes when no node and no graph output reads it."""
    outputs = {t.name for t in graph.outputs}
    count = 0
    for node in graph.nodes:
        if node.op == "MaxPool" and len(node.outputs) == 2:
            indices = node.outputs[1]
            if not indices.outputs and indices.name not in outputs:
                node.outputs.pop()
                count += 1
    return count


def _recompute_chain(graph: gs.Graph, names: NameAllocator, chain_scope: str, bands: dict[int, _Band]) -> str | None:
    """Rewrite one chain's backward band by band; returns the name of one node it added (a marker)."""
    em = Emitter(graph, names, scoped(chain_scope, RECOMPUTE_SCOPE))
    # First: the band gradients of the entry then leave each band through the assembly, which
    # the data edges below can wait for (ORT's per-band SliceGrads go away).
    _assemble_entry_gradient(em, bands)
    # Before the edges: band j-1 must wait for the running sum that includes band j's partial
    # weight gradients, not only for the partials themselves. Otherwise ORT's reverse DFS may
    # enter band 0's backward (which, by the edges, needs every later band) before any Add,
    # run all the Adds at the very end, and keep K partial gradients of every weight alive
    # (VGG-16 at 480x480, K = 15: about 450 MiB more than the bands themselves).
    running = _accumulate_in_band_order(graph, names, bands)
    order = sorted(bands, reverse=True)  # the backward runs the last band first
    finished: list[gs.Tensor] = []  # gradients the previous band's backward hands out
    marker = None
    for j in order:
        band = bands[j]
        if not band.backward:
            finished = []
            continue
        copies = _clone_forward(graph, names, band)
        marker = marker or next((copy.inputs[0].name for copy in copies.values()), None)
        incoming = _incoming_gradients(band)
        _order_after(em, band, copies, incoming + finished, j)
        for node in band.backward:
            node.inputs = [copies.get(t.name, t) if t is not None else t for t in node.inputs]
        finished = [running.get(t.name, t) for t in _outgoing(band)]
    return marker


def _clone_forward(graph: gs.Graph, names: NameAllocator, band: _Band) -> dict[str, gs.Variable]:
    """Copy the band's forward nodes that produce what its gradient nodes read; old name -> copy."""
    produced = {t.name: node for node in band.forward for t in node.outputs}
    read = {t.name for node in band.backward for t in node.inputs if t is not None and t.name in produced}
    needed: set[int] = set()
    stack = [produced[name] for name in read]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(produced[t.name] for t in node.inputs if t is not None and t.name in produced)
    copies: dict[str, gs.Variable] = {}
    for node in band.forward:
        if id(node) not in needed:
            continue
        outputs = []
        for t in node.outputs:
            copy = gs.Variable(names.fresh(scoped(t.name, RECOMPUTED)), dtype=t.dtype, shape=t.shape)
            copies[t.name] = copy
            outputs.append(copy)
        inputs = [copies.get(t.name, t) if t is not None else t for t in node.inputs]
        # A node named like its output (Emitter's convention) keeps sharing the name with it.
        same = next((copies[t.name].name for t in node.outputs if t.name == node.name), None)
        clone_name = same or names.fresh(scoped(node.name, RECOMPUTED))
        clone = gs.Node(op=node.op, name=clone_name, attrs=dict(node.attrs), inputs=inputs, outputs=outputs)
        clone.domain = node.domain
        graph.nodes.append(clone)
    return copies


def _incoming_gradients(band: _Band) -> list[gs.Tensor]:
    """Gradients that flow into the band's backward from outside it (the band's output gradient).

    Inputs of the band's gradient nodes that are gradients and do not themselves depend on the
    band's gradient nodes: ORT sums a gradient that has several readers inside the band (a
    residual input) with a node named after the tensor, not the band, which must not count.
    """
    inside = {id(node) for node in band.backward} | {id(node) for node in band.forward}
    downstream: set[int] = set()
    frontier = [t for node in band.backward for t in node.outputs]
    while frontier:
        tensor = frontier.pop()
        for reader in tensor.outputs:
            if id(reader) not in downstream:
                downstream.add(id(reader))
                frontier.extend(reader.outputs)
    tensors: dict[str, gs.Tensor] = {}
    for node in band.backward:
        for t in node.inputs:
            if t is None or isinstance(t, gs.Constant) or not t.inputs:
                continue
            producer = t.inputs[0]
            if id(producer) in inside or id(producer) in downstream:
                continue
            if t.name.endswith(GRADIENT_SUFFIX) or GRADIENT_NODE_MARK in (producer.name or ""):
                tensors[t.name] = t
    return list(tensors.values())


def _outgoing(band: _Band) -> list[gs.Tensor]:
    """What the band's backward hands out: tensors it produces that a node outside it reads."""
    inside = {id(node) for node in band.backward}
    result = []
    for node in band.backward:
        for t in node.outputs:
            if t.name and any(id(reader) not in inside for reader in t.outputs):
                result.append(t)
    return result


def _order_after(em: Emitter, band: _Band, copies: dict[str, gs.Variable], after: list[gs.Tensor], j: int) -> None:
    """Make the copied band's entry Slice wait for `after` (see module docstring)."""
    entry = next(
        (
            node
            for node in band.forward
            if node.op == "Slice" and node.name == band.entry and node.outputs[0].name in copies
        ),
        None,
    )
    if entry is None or not after:
        return
    clone = copies[entry.outputs[0].name].inputs[0]
    empties = []
    for index, tensor in enumerate(after):
        empty = em.op("Slice", f"edge{j}/after{index}", [tensor, em.ints([0]), em.ints([0]), em.ints([0])])
        empties.append(em.op("Reshape", f"edge{j}/after{index}/flat", [empty, em.ints([0])], (0,)))
    joined = empties[0] if len(empties) == 1 else em.op("Concat", f"edge{j}/after", empties, (0,), attrs={"axis": 0})
    edge = em.op("Cast", f"edge{j}/after/i64", [joined], (0,), dtype=np.int64, attrs={"to": onnx.TensorProto.INT64})
    starts = clone.inputs[1]
    clone.inputs[1] = em.op("Concat", f"edge{j}/starts", [starts, edge], (1,), dtype=np.int64, attrs={"axis": 0})


def _accumulate_in_band_order(graph: gs.Graph, names: NameAllocator, bands: dict[int, _Band]) -> dict[str, gs.Variable]:
    """Replace ORT's Sum of per-band gradients by Adds in backward (descending band) order.

    Returns, for every term but the first of each sum, the running sum that adds it.
    """
    running: dict[str, gs.Variable] = {}
    band_of = {id(node): j for j, band in bands.items() for node in band.backward}
    for node in list(graph.nodes):
        if node.op != "Sum" or len(node.inputs) < 2:
            continue
        if not all(t.inputs and id(t.inputs[0]) in band_of for t in node.inputs):
            continue
        terms = sorted(node.inputs, key=lambda t: -band_of[id(t.inputs[0])])
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        total = terms[0]
        for index, term in enumerate(terms[1:], start=1):
            last = index == len(terms) - 1
            partial = names.fresh(f"{out.name}/partial{index}")
            result = out if last else gs.Variable(partial, dtype=out.dtype, shape=out.shape)
            add = names.fresh(f"{out.name}/add{index}")
            graph.nodes.append(gs.Node(op="Add", name=add, inputs=[total, term], outputs=[result]))
            running[term.name] = result
            total = result
    return running


def _leading_constant(starts: gs.Tensor) -> int | None:
    """The start row of a band's entry Slice: a constant, or (2PS bands after the first) a constant
    concatenated with the empty ordering edge of row_tiling._entry_rows; None otherwise."""
    if isinstance(starts, gs.Constant):
        return int(starts.values.reshape(-1)[0]) if starts.values.size == 1 else None
    # ORT's gradient builder turns a Concat into ConcatTraining (same first output).
    if len(starts.inputs) != 1 or starts.inputs[0].op not in ("Concat", "ConcatTraining"):
        return None
    first, *edges = starts.inputs[0].inputs
    if not isinstance(first, gs.Constant) or first.values.size != 1:
        return None
    if any(edge.shape is None or list(edge.shape) != [0] for edge in edges):
        return None
    return int(first.values.reshape(-1)[0])


def _assemble_entry_gradient(em: Emitter, bands: dict[int, _Band]) -> None:
    """One full-size entry gradient from the band gradients, halos added (replaces SliceGrads + Sum)."""
    grads = []
    for j, band in sorted(bands.items()):
        node = next((n for n in band.backward if n.op == "SliceGrad" and n.name.startswith(band.entry)), None)
        if node is None:
            continue
        starts, ends, axes = node.inputs[2:5]
        start = _leading_constant(starts)
        if start is None or not all(isinstance(t, gs.Constant) for t in (ends, axes)) or list(axes.values) != [2]:
            return
        grads.append((start, int(ends.values[0]), node, j))
    if not grads:
        return
    full = grads[0][2].outputs[0]
    shape = grads[0][2].inputs[1]  # SliceGrad's second input: the entry's shape (often a Shape node)
    sums = [reader for reader in full.outputs if reader.op == "Sum"]
    if len(sums) != 1:
        return
    accumulate = sums[0]
    if not all(any(t is g[2].outputs[0] for t in accumulate.inputs) for g in grads):
        return
    borders = sorted({s for s, _, _, _ in grads} | {e for _, e, _, _ in grads})
    pieces = []
    for top, bottom in zip(borders, borders[1:], strict=False):
        terms = []
        for start, end, node, j in grads:
            if start <= top and bottom <= end:
                band_grad = node.inputs[0]
                inputs = [band_grad, em.ints([top - start]), em.ints([bottom - start]), em.ints([2])]
                terms.append(em.op("Slice", f"entry_grad/rows{top}_{bottom}/from{j}", inputs))
        total = terms[0]
        for index, term in enumerate(terms[1:], start=1):
            total = em.op("Add", f"entry_grad/rows{top}_{bottom}/sum{index}", [total, term])
        pieces.append(total)
    covered = em.op("Concat", "entry_grad/rows", pieces, attrs={"axis": 2})
    # One SliceGrad places the rows the bands read into a zero tensor of the entry's shape (rows
    # no band read, below a floor-mode pool, get 0), where ORT had one per band.
    inputs = [covered, shape, em.ints([borders[0]]), em.ints([borders[-1]]), em.ints([2])]
    placed = em.op("SliceGrad", "entry_grad", inputs, domain=MS_DOMAIN)
    slice_grads = {id(g[2].outputs[0]) for g in grads}
    others = [t for t in accumulate.inputs if id(t) not in slice_grads]
    accumulate.inputs = [*others, placed]
    if len(accumulate.inputs) == 1:
        accumulate.op = "Identity"
    for _, _, node, _ in grads:
        node.outputs.clear()


__all__ = ["FACTS", "REQUIRES", "STAGE", "drop_unread_pool_indices", "run", "tiled_bands"]
