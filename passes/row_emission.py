"""Emitting a chain as row bands: the graph rewrite of one chain. Not a pass.

`tile_chain` replaces a chain's nodes by one copy per band (per-band pads, Slices of the
rows each band reads) and a Concat of the band outputs into the chain's exit tensor. Band
nodes are named "<chain scope>/band<j>/..." (`passes.names`), which row_recompute and the
memory model parse back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .emitter import Emitter
from .names import BAND, ENTRY, NameAllocator, preferred_chain_scope
from .row_chains import Chain, OpInfo, padding_only_refusal
from .row_geometry import BandSchedule, Rows, Strategy, clip_rows, schedule


@dataclass(frozen=True)
class _Band:
    """A tensor that holds rows [lo, hi) of a chain tensor."""

    tensor: gs.Tensor
    lo: int
    hi: int


def _rows(em: Emitter, band: _Band, start: int, stop: int, name: str, shape: tuple[int, ...]) -> gs.Tensor:
    """Rows [start, stop) of a chain tensor out of a band that holds them (a Slice, or the band itself)."""
    assert band.lo <= start < stop <= band.hi, (band.lo, band.hi, start, stop, name)
    if (start, stop) == (band.lo, band.hi):
        return band.tensor
    n, c, _, w = shape
    inputs = [band.tensor, em.ints([start - band.lo]), em.ints([stop - band.lo]), em.ints([2])]
    return em.op("Slice", name, inputs, (n, c, stop - start, w))


def _band_op(em: Emitter, chain: Chain, op: OpInfo, inputs: dict[int, _Band], rows: Rows, tag: str) -> gs.Variable:
    """Emit `op` computing output rows `rows` from band tensors that hold what it reads."""
    node = op.node
    out_name = node.outputs[0].name
    n, c, _, w = chain.shapes[out_name]
    new_inputs = list(node.inputs)
    attrs = dict(node.attrs)
    base = node.name or out_name
    if op.window:
        source = node.inputs[0].name
        height = chain.shapes[source][2]
        want = op.row.input_rows(*rows)
        have = clip_rows(want, height)
        band = inputs[chain.tensor_ids[source]]
        new_inputs[0] = _rows(em, band, have[0], have[1], f"{tag}/{base}/rows", chain.shapes[source])
        right = op.width.pad_bottom
        if op.width.ceil_mode:
            # ceil_mode is dropped (rows are exact per band), so a ceil-mode pool's last column
            # window is kept by padding the right instead: MaxPool ignores pad values.
            w_in, w_out = chain.shapes[source][3], chain.shapes[out_name][3]
            right = max(right, op.width.input_rows(0, w_out)[1] - w_in)
        attrs["pads"] = [have[0] - want[0], op.width.pad_top, want[1] - have[1], right]
        attrs.pop("auto_pad", None)
        if node.op != "Conv":
            attrs["ceil_mode"] = 0
    else:
        for slot in op.data_slots:
            source = node.inputs[slot].name
            band = inputs[chain.tensor_ids[source]]
            new_inputs[slot] = _rows(em, band, rows[0], rows[1], f"{tag}/{base}/in{slot}", chain.shapes[source])
    dtype = node.outputs[0].dtype or np.float32
    shape = (n, c, rows[1] - rows[0], w)
    return em.op(node.op, f"{tag}/{base}", new_inputs, shape, dtype=dtype, attrs=attrs, domain=node.domain)


def _finish(chain: Chain, em: Emitter, pieces: list[gs.Tensor]) -> None:
    """Concatenate the bands into the chain's exit tensor and detach the original nodes."""
    for op in chain.ops:
        op.node.outputs.clear()
        op.node.inputs.clear()
    em.op("Concat", "concat", pieces, attrs={"axis": 2}, into=chain.exit)


@dataclass(frozen=True)
class TiledChain:
    """What `tile_chain` did: the schedule it used and the scope its band nodes are named in."""

    schedule: BandSchedule
    scope: str


def tile_chain(
    graph: gs.Graph, chain: Chain, bands: int, strategy: Strategy, names: NameAllocator | None = None
) -> TiledChain:
    """Rewrite one chain into `bands` row bands in place (names from `names`, or a new allocator)."""
    plan = schedule(chain.geometry, bands, strategy)
    em = Emitter(graph, names or NameAllocator(graph), preferred_chain_scope(chain.name))
    tensor_names = {i: name for name, i in chain.tensor_ids.items()}
    entry_shape = chain.shapes[chain.entry.name]
    entry_band = _Band(chain.entry, 0, chain.geometry.heights[0])
    pieces: list[gs.Tensor] = []
    refusal = padding_only_refusal(chain, plan)
    if refusal:
        raise ValueError(refusal)
    if strategy == "overl":
        for j in range(bands):
            tag = f"{BAND}{j}"
            x_rows = plan.held[j][0]
            assert x_rows is not None
            held = {0: _Band(_rows(em, entry_band, *x_rows, f"{tag}/{ENTRY}", entry_shape), *x_rows)}
            for op, row_node in zip(chain.ops, chain.geometry.nodes, strict=True):
                rows = plan.held[j][row_node.output]
                assert rows is not None
                held[row_node.output] = _Band(_band_op(em, chain, op, held, rows, tag), *rows)
            pieces.append(held[chain.geometry.exit].tensor)
        _finish(chain, em, pieces)
        return TiledChain(plan, em.scope)

    previous: dict[int, _Band] = {}
    after: list[gs.Tensor] = []  # the last tensors of the previous band (see _after)
    for j in range(bands):
        tag = f"{BAND}{j}"
        held: dict[int, _Band] = {}
        x_rows = plan.held[j][0]
        if x_rows is not None:
            held[0] = _Band(_entry_rows(em, chain.entry, entry_shape, x_rows, after, j), *x_rows)
        for op, row_node in zip(chain.ops, chain.geometry.nodes, strict=True):
            t = row_node.output
            new_rows = plan.new[j][t]
            parts: list[gs.Tensor] = []
            carried = plan.carried(j, t)
            if carried is not None:
                parts.append(previous[t].tensor)
            fresh = _band_op(em, chain, op, held, new_rows, tag) if new_rows is not None else None
            if t == chain.geometry.exit:
                if fresh is not None:
                    pieces.append(fresh)
                continue
            if fresh is not None:
                parts.append(fresh)
            rows = plan.held[j][t]
            if rows is None:
                continue
            if len(parts) == 1:
                held[t] = _Band(parts[0], *rows)
            else:
                n, c, _, w = chain.shapes[tensor_names[t]]
                shape = (n, c, rows[1] - rows[0], w)
                held[t] = _Band(
                    em.op("Concat", f"{tag}/{tensor_names[t]}/held", parts, shape, attrs={"axis": 2}), *rows
                )
        # What band j+1 takes over, sliced now so that band j's tensors die with band j.
        previous = {}
        after = [pieces[-1]] if pieces else []
        if j + 1 < bands:
            for t, band in held.items():
                if t == 0:
                    continue
                carried = plan.carried(j + 1, t)
                if carried is not None:
                    tensor = _rows(em, band, *carried, f"{tag}/{tensor_names[t]}/carry", chain.shapes[tensor_names[t]])
                    previous[t] = _Band(tensor, *carried)
                    after.append(tensor)
    _finish(chain, em, pieces)
    return TiledChain(plan, em.scope)


def _entry_rows(
    em: Emitter, entry: gs.Tensor, shape: tuple[int, ...], rows: Rows, after: list[gs.Tensor], band: int
) -> gs.Tensor:
    """Entry rows of 2PS band `band`, ordered after the previous band by a data edge.

    The edge is an empty int64 tensor derived from the previous band's last tensors (its
    exit rows and the rows it hands over) and concatenated into the Slice's `starts`: it
    changes no value, costs a few ops on empty tensors, and no ORT optimizer can fold it
    (its inputs are not constant), so any topological order, ORT's reverse DFS included,
    finishes band j (and can free its tensors) before band j+1 starts. The edge's nodes are
    named after band j, whose end they mark.
    """
    n, c, _, w = shape
    tag = f"{BAND}{band}"
    if not after:
        inputs = [entry, em.ints([rows[0]]), em.ints([rows[1]]), em.ints([2])]
        return em.op("Slice", f"{tag}/{ENTRY}", inputs, (n, c, rows[1] - rows[0], w))
    done = f"{BAND}{band - 1}/done"
    empties = []
    for index, tensor in enumerate(after):
        empty = em.op("Slice", f"{done}{index}", [tensor, em.ints([0]), em.ints([0]), em.ints([0])])
        empties.append(em.op("Reshape", f"{done}{index}/flat", [empty, em.ints([0])], (0,)))
    joined = empties[0] if len(empties) == 1 else em.op("Concat", done, empties, (0,), attrs={"axis": 0})
    edge = em.op("Cast", f"{done}/i64", [joined], (0,), dtype=np.int64, attrs={"to": onnx.TensorProto.INT64})
    starts = em.op(
        "Concat", f"{tag}/{ENTRY}/starts", [em.ints([rows[0]]), edge], (1,), dtype=np.int64, attrs={"axis": 0}
    )
    inputs = [entry, starts, em.ints([rows[1]]), em.ints([2])]
    return em.op("Slice", f"{tag}/{ENTRY}", inputs, (n, c, rows[1] - rows[0], w))
