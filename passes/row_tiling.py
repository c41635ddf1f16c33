"""Row-centric tiling of frozen conv chains (LR-CNN, Wang et al. 2024), an exact forward rewrite.

A *chain* is a region of row-local ops (Conv, per-channel Mul/Add/Sub/Div, Relu/Clip and
other pointwise activations, MaxPool/AveragePool, residual Add of two in-chain tensors)
between one entry tensor X and one exit tensor Y, where every tensor inside is read only
inside the chain and Y is smaller than the chain's largest intermediate (it ends at a pool
or a strided conv). The chain is rewritten into K horizontal bands: Slice on H, every op
once per band with per-band pads (the top pad only where a band touches the image top,
the bottom pad only at the image bottom), and a Concat of the band outputs into Y. Full-size
intermediates never exist; ORT frees a band's tensors before the next band starts.

Band geometry is derived backwards from the output: the K bands split Y's rows evenly and
each op's output rows [a, b) read input rows [a*s - p_top, (b-1)*s - p_top + d*(k-1) + 1)
(clipped to the image). A pool window or a strided conv's receptive field therefore never
straddles two bands: every band computes whole output rows of every op.

Two strategies (`plan.row_strategy`):

* ``overl``: every band reads its whole halo from X and recomputes the overlap rows; bands
  are independent. Long chains are cut ("re-partitioned") at downsampling points where the
  halo recompute would exceed `MAX_OVERL_RECOMPUTE`.
* ``2ps`` (two-phase sharing): every row of every tensor is computed once. Band j computes
  the new rows [end_{j-1}, end_j) of each tensor and keeps the rows the next band still
  needs (about k-1 per conv); band j+1 prepends them (Concat) instead of recomputing.
  Bands depend on each other, so an explicit data edge (an empty tensor derived from
  band j's last tensors, concatenated into band j+1's Slice `starts`) makes every
  topological order, ORT's default reverse DFS included, finish band j before band j+1.

By default only the frozen prefix is tiled (nodes that do not depend on a trainable
parameter): no gradient flows through it, so its peak memory is bounded by band sizes (as
in MCUNetV2's patch-based inference). With `plan.row_tile_trainable` (see `tiles_trainable`)
trainable chains are tiled too, with either strategy; the training-stage pass `row_recompute`
then recomputes each band's forward inside the backward, so only band boundaries are kept
(OverL: the chain's entry; 2PS: the entry and the rows each band hands to the next, which the
recomputed band reads again, so its rows equal the forward's). With 2PS the gradient of a
handed-over row flows from band j+1's backward into band j's, which the backward's
last-band-first order already satisfies; every row is still computed, and back-propagated,
once per step (plus once more in the recompute).

Which chains, and how many bands each (`select_chains`): a small dynamic program over the
downsampling points minimizes the estimated peak (`chain_peak_bytes`); the chain that sets
the peak gets K bands, smaller chains the fewest bands that stay under it. The artifacts
need the session options of `required_session_options`; `tiles_for_budget` picks K for
`--memory-budget` from a simulation of ORT's execution order (`estimate_peak_bytes`).

Not tiled, on purpose: a region ends at any op that is not row-local, which includes
DeepLab's ASPP. Its branches are joined by a channel Concat, but one branch is a global
average pool (every output row depends on every input row, so a band would need all the
rows first: a two-pass schedule, not a band schedule), and the atrous branches (dilation
12/24/36 on the 64-row map of a 512x512 input) read up to 73 rows per output row: a band of
64/K rows would need nearly the whole map as halo, so OverL would recompute each band
about K times and 2PS would carry more rows than a band computes, with no memory saved.
AveragePool with ceil_mode ends a chain too (its divisor at the bottom border depends on
ceil mode, not only on the pads); MaxPool with ceil_mode is tiled (it ignores padding, so
the pass pads the last window instead).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan, Stage

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ("bn_eval_affine",)
FACTS: tuple[str, ...] = ("static_shapes",)

Strategy = Literal["overl", "2ps"]
STRATEGIES: tuple[str, ...] = ("overl", "2ps")

# OverL recomputes halo rows; a chain is not extended past a downsampling point when that
# would make the recomputed work (MAC-weighted) exceed this fraction of the chain's work.
MAX_OVERL_RECOMPUTE = 0.10
# A chain must end at a tensor at most this fraction of its largest intermediate, else
# tiling cannot lower the peak (the concatenated output is as large as what it replaces).
MAX_EXIT_RATIO = 0.75
MIB = 1 << 20

_LOG = logging.getLogger(__name__)

_POINTWISE_UNARY = {
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "Identity",
}
_POINTWISE_BINARY = {"Mul", "Add", "Sub", "Div", "PRelu"}
_BAND_NODE = re.compile(r"^rowtile/(.+?)/band(\d+)/")  # names of the nodes tile_chain emits per band
_WINDOW_OPS = {"Conv", "MaxPool", "AveragePool"}


# --------------------------------------------------------------------------------------------
# Row geometry (pure; no graph)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOp:
    """How one op maps output rows to input rows on the H axis (pointwise ops: the defaults)."""

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_top: int = 0
    pad_bottom: int = 0
    ceil_mode: bool = False

    @property
    def extent(self) -> int:
        """Input rows one output row reads."""
        return self.dilation * (self.kernel - 1) + 1

    def input_rows(self, start: int, stop: int) -> tuple[int, int]:
        """Input rows (unclipped: negative or past the image means padding) that output rows [start, stop) read."""
        return start * self.stride - self.pad_top, (stop - 1) * self.stride - self.pad_top + self.extent

    def output_height(self, height: int) -> int:
        span = height + self.pad_top + self.pad_bottom - self.extent
        if span < 0:
            raise ValueError(f"{self} reads more rows than its input has ({height})")
        return (-(-span // self.stride) if self.ceil_mode else span // self.stride) + 1


@dataclass(frozen=True)
class RowNode:
    """One op of a chain: its row map, the tensor ids it reads (in-chain tensors only) and writes."""

    op: RowOp
    inputs: tuple[int, ...]
    output: int


@dataclass(frozen=True)
class RowGraph:
    """H-axis geometry of a chain: tensor 0 is the entry, `exit` the output; nodes in topological order."""

    heights: tuple[int, ...]
    nodes: tuple[RowNode, ...]
    exit: int

    @classmethod
    def linear(cls, ops: Sequence[RowOp], height: int) -> RowGraph:
        heights = [height]
        nodes = []
        for index, op in enumerate(ops):
            heights.append(op.output_height(heights[-1]))
            nodes.append(RowNode(op, (index,), index + 1))
        return cls(tuple(heights), tuple(nodes), len(ops))

    @property
    def out_height(self) -> int:
        return self.heights[self.exit]

    def consumers(self) -> dict[int, list[RowNode]]:
        readers: dict[int, list[RowNode]] = {t: [] for t in range(len(self.heights))}
        for node in self.nodes:
            for t in node.inputs:
                readers[t].append(node)
        return readers


Rows = tuple[int, int]


@dataclass(frozen=True)
class BandSchedule:
    """Per band j and tensor t: the rows band j holds of t (`held`) and the rows it computes (`new`).

    OverL: held == new (each band computes its rows, halo included, from X).
    2PS: `new` are disjoint across bands; `held` = carried rows from band j-1 + `new`.
    Tensors a band does not touch map to None.
    """

    strategy: Strategy
    geometry: RowGraph
    held: tuple[dict[int, Rows | None], ...]
    new: tuple[dict[int, Rows | None], ...]

    @property
    def bands(self) -> int:
        return len(self.held)

    def carried(self, j: int, t: int) -> Rows | None:
        """Rows of tensor t that band j takes over from band j-1 (2PS)."""
        held, new = self.held[j].get(t), self.new[j].get(t)
        if held is None:
            return None
        stop = new[0] if new is not None else held[1]
        return (held[0], stop) if stop > held[0] else None


def output_splits(height: int, bands: int) -> list[int]:
    """Even split of `height` output rows into `bands` bands: the K+1 boundaries."""
    return [(j * height) // bands for j in range(bands + 1)]


def _clip(rows: Rows, height: int) -> Rows:
    return max(rows[0], 0), min(rows[1], height)


def _check_bands(geometry: RowGraph, bands: int) -> None:
    if isinstance(bands, bool) or not isinstance(bands, int | np.integer) or bands < 1:
        raise ValueError(f"row tiling: the number of bands must be an integer >= 1, got {bands!r}")
    if bands > geometry.out_height:
        raise ValueError(
            f"row tiling: {bands} bands is more than the {geometry.out_height} output rows of the chain "
            f"(input height {geometry.heights[0]}); use at most {geometry.out_height} bands"
        )


def schedule(geometry: RowGraph, bands: int, strategy: Strategy = "overl") -> BandSchedule:
    """The rows every band holds and computes of every tensor of the chain."""
    _check_bands(geometry, bands)
    if strategy not in STRATEGIES:
        raise ValueError(f"row tiling: unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    splits = output_splits(geometry.out_height, bands)
    readers = geometry.consumers()
    position = {node.output: index for index, node in enumerate(geometry.nodes)}
    position[0] = -1
    order = sorted(range(len(geometry.heights)), key=lambda t: -position[t])
    if strategy == "overl":
        held: list[dict[int, Rows | None]] = []
        for j in range(bands):
            rows: dict[int, Rows | None] = {geometry.exit: (splits[j], splits[j + 1])}
            for t in order:
                if t == geometry.exit:
                    continue
                rows[t] = _hull(
                    _clip(node.op.input_rows(*rows[node.output]), geometry.heights[t])
                    for node in readers[t]
                    if rows.get(node.output) is not None
                )
            held.append(rows)
        return BandSchedule("overl", geometry, tuple(held), tuple(dict(r) for r in held))

    # 2PS: the rows computed by the end of band j (a prefix [0, end_j) of every tensor).
    def prefix(exit_end: int) -> dict[int, int]:
        end: dict[int, int] = {geometry.exit: exit_end}
        for t in order:
            if t == geometry.exit:
                continue
            needed = [
                _clip(node.op.input_rows(0, end[node.output]), geometry.heights[t])[1]
                for node in readers[t]
                if end[node.output] > 0
            ]
            end[t] = max(needed, default=0)
        return end

    # Band j must compute everything the rows it outputs depend on, so the first band's entry
    # rows grow with the chain's receptive field. Split the output so that the bands get
    # even shares of the entry rows instead (the entry level is the widest in rows).
    splits = [0]
    for j in range(1, bands):
        low, high = splits[-1] + 1, geometry.out_height - (bands - j)
        target = j * geometry.heights[0] / bands
        while low < high:  # the largest exit end whose entry prefix stays within the target
            mid = (low + high + 1) // 2
            low, high = (mid, high) if prefix(mid)[0] <= target else (low, mid - 1)
        splits.append(low)
    splits.append(geometry.out_height)
    ends = [prefix(splits[j + 1]) for j in range(bands)]
    new: list[dict[int, Rows | None]] = []
    for j in range(bands):
        new.append(
            {
                t: (ends[j - 1][t] if j else 0, ends[j][t]) if ends[j][t] > (ends[j - 1][t] if j else 0) else None
                for t in range(len(geometry.heights))
            }
        )
    # First row each band needs of each tensor: what its readers' new rows read.
    lows: list[dict[int, int]] = []
    for j in range(bands):
        low: dict[int, int] = {}
        for t in range(len(geometry.heights)):
            first = ends[j - 1][t] if j else 0
            for node in readers[t]:
                rows = new[j][node.output]
                if rows is not None:
                    first = min(first, _clip(node.op.input_rows(*rows), geometry.heights[t])[0])
            low[t] = first
        lows.append(low)
    # A band can only take over rows the previous band held: widen earlier bands if needed.
    for j in range(bands - 1, 0, -1):
        for t in lows[j]:
            lows[j - 1][t] = min(lows[j - 1][t], lows[j][t])
    held_2ps: list[dict[int, Rows | None]] = []
    for j in range(bands):
        held_2ps.append(
            {t: (lows[j][t], ends[j][t]) if ends[j][t] > lows[j][t] else None for t in range(len(geometry.heights))}
        )
    return BandSchedule("2ps", geometry, tuple(held_2ps), tuple(new))


def _hull(rows: Iterable[Rows]) -> Rows | None:
    rows = [r for r in rows if r[1] > r[0]]
    if not rows:
        return None
    return min(r[0] for r in rows), max(r[1] for r in rows)


def band_plan(
    geometry: RowGraph | Sequence[RowOp], height: int | None, bands: int, strategy: Strategy = "overl"
) -> list[tuple[int, int, int, int]]:
    """(in_start, in_end, out_start, out_end) per band: the entry rows a band reads, the exit rows it writes.

    `geometry` is a chain's RowGraph or a plain list of RowOps (a linear chain on an input
    of `height` rows). OverL bands read overlapping entry rows (their halos) and write an
    even split of the output. 2PS bands read their new entry rows plus what their first ops
    still need from the previous band; their output split is chosen so that the new entry
    rows are shared evenly (band 0 must also compute the halo of everything below it).
    """
    if not isinstance(geometry, RowGraph):
        if height is None:
            raise ValueError("band_plan: a list of RowOps needs the input height")
        geometry = RowGraph.linear(list(geometry), height)
    elif height is not None and height != geometry.heights[0]:
        raise ValueError(f"band_plan: height {height} does not match the chain's input height {geometry.heights[0]}")
    plan = schedule(geometry, bands, strategy)
    result = []
    for j in range(bands):
        entry = plan.held[j][0] or (0, 0)
        out = plan.new[j][geometry.exit]
        assert out is not None
        result.append((entry[0], entry[1], out[0], out[1]))
    return result


def recompute_overhead(plan: BandSchedule, row_costs: Sequence[float]) -> float:
    """Extra work of a schedule, as a fraction of the untiled chain's: sum of rows computed x cost per row.

    `row_costs[i]` is the cost of one output row of node i (e.g. its MACs per row).
    """
    geometry = plan.geometry
    full = sum(cost * geometry.heights[node.output] for node, cost in zip(geometry.nodes, row_costs, strict=True))
    done = 0.0
    for j in range(plan.bands):
        for node, cost in zip(geometry.nodes, row_costs, strict=True):
            rows = plan.new[j][node.output]
            if rows is not None:
                done += cost * (rows[1] - rows[0])
    return done / full - 1.0 if full else 0.0


# --------------------------------------------------------------------------------------------
# Finding chains in a graph
# --------------------------------------------------------------------------------------------


@dataclass
class _OpInfo:
    """A tileable node: its row map, W-axis geometry and which inputs are chain tensors."""

    node: gs.Node
    row: RowOp
    width: RowOp
    window: bool  # Conv/pool (band pads) rather than pointwise
    data_slots: tuple[int, ...]  # input positions that carry activations
    out_channels: int | None  # Conv: weight dim 0; else same as the input
    trainable: bool = False  # depends on a trainable parameter (gradients flow through it)


@dataclass
class Chain:
    """A tileable region of the graph between `entry` and `exit` (see the module docstring)."""

    entry: gs.Variable
    exit: gs.Variable
    ops: list[_OpInfo]
    geometry: RowGraph
    shapes: dict[str, tuple[int, int, int, int]]
    tensor_ids: dict[str, int] = field(default_factory=dict)
    bands: int = 0  # set by select_chains
    strategy: Strategy = "overl"  # set by select_chains

    @property
    def trainable(self) -> bool:
        return any(op.trainable for op in self.ops)

    @property
    def name(self) -> str:
        return self.exit.name

    def row_costs(self) -> list[float]:
        """MACs (or element ops, for pools and pointwise ops) per output row of every node."""
        costs = []
        for op in self.ops:
            n, c, _, w = self.shapes[op.node.outputs[0].name]
            if op.node.op == "Conv":
                weight = op.node.inputs[1].values
                costs.append(float(n * c * w * weight.shape[1] * weight.shape[2] * weight.shape[3]))
            else:
                costs.append(float(n * c * w * op.row.kernel))
        return costs

    def tensor_bytes(self, name: str) -> int:
        return 4 * math.prod(self.shapes[name])


def _ints(node: gs.Node, key: str, default: Sequence[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(key, default)]


def _auto_pads(node: gs.Node, size: tuple[int, int], kernel, strides, dilations) -> list[int] | None:
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return _ints(node, "pads", (0, 0, 0, 0))
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    begins, ends = [], []
    for length, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        out = -(-length // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - length)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return [begins[0], begins[1], ends[0], ends[1]]


def _window_info(node: gs.Node, in_shape: tuple[int, ...]) -> _OpInfo | None:
    if len(node.outputs) != 1 or len(in_shape) != 4:
        return None
    if node.op == "Conv":
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.name and not isinstance(bias, gs.Constant):
            return None
        weight = node.inputs[1].values
        if weight.ndim != 4:
            return None
        kernel = _ints(node, "kernel_shape", weight.shape[2:])
        out_channels: int | None = int(weight.shape[0])
        if in_shape[1] != weight.shape[1] * int(node.attrs.get("group", 1)):
            return None
    else:
        kernel = _ints(node, "kernel_shape", ())
        out_channels = None
        if node.op == "AveragePool" and int(node.attrs.get("ceil_mode", 0)):
            # Its divisor at the bottom border depends on ceil mode, not only on pads.
            return None
    if len(kernel) != 2:
        return None
    strides = _ints(node, "strides", (1, 1))
    dilations = _ints(node, "dilations", (1, 1))
    pads = _auto_pads(node, (in_shape[2], in_shape[3]), kernel, strides, dilations)
    if pads is None or min(pads) < 0:
        return None
    ceil = bool(int(node.attrs.get("ceil_mode", 0))) if node.op != "Conv" else False
    row = RowOp(kernel[0], strides[0], dilations[0], pads[0], pads[2], ceil)
    width = RowOp(kernel[1], strides[1], dilations[1], pads[1], pads[3], ceil)
    return _OpInfo(node, row, width, True, (0,), out_channels)


def _broadcasts_per_row(value: np.ndarray, shape: tuple[int, ...]) -> bool:
    """A constant operand that is the same for every row (H dim absent or 1) and does not grow the tensor."""
    if value.ndim > len(shape):
        return False
    if value.ndim >= 2 and value.shape[-2] != 1:
        return False
    try:
        return tuple(np.broadcast_shapes(value.shape, shape)) == tuple(shape)
    except ValueError:
        return False


def _pointwise_info(
    node: gs.Node, produced: set[str], shape: tuple[int, ...], params: dict[str, tuple[int, ...]] | None = None
) -> _OpInfo | None:
    """A pointwise op on chain tensors; other operands must be constants (or, when tiling trainable
    layers, parameter tensors in `params`, e.g. a trainable BN's scale) that are the same for every row."""
    if len(node.outputs) != 1 or len(shape) != 4:
        return None
    slots = []
    for slot, tensor in enumerate(node.inputs):
        if tensor is None or not tensor.name:
            continue
        if tensor.name in produced:
            slots.append(slot)
        elif isinstance(tensor, gs.Constant):
            if node.op in _POINTWISE_BINARY and not _broadcasts_per_row(tensor.values, shape):
                return None
        elif params is not None and tensor.name in params and node.op in _POINTWISE_BINARY:
            if not _broadcasts_per_row(np.empty(params[tensor.name], dtype=np.float32), shape):
                return None
        else:
            return None
    if not slots:
        return None
    if node.op in _POINTWISE_UNARY and slots != [0]:
        return None
    return _OpInfo(node, RowOp(), RowOp(), False, tuple(slots), None)


def _parameter_tensors(graph: gs.Graph) -> dict[str, tuple[int, ...]]:
    """Variables computed from initializers only (no data input), with their shapes where known.

    The trainable BN affine's scale and shift are such tensors (Reshape of gamma-derived values).
    """
    data = {t.name for t in graph.inputs if not isinstance(t, gs.Constant)}
    params: dict[str, tuple[int, ...]] = {}
    for node in graph.nodes:
        if any(t is not None and t.name in data for t in node.inputs):
            data.update(t.name for t in node.outputs)
            continue
        for out in node.outputs:
            shape = _shape(out)
            if shape is None and node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
                dims = [int(d) for d in node.inputs[1].values.reshape(-1)]
                shape = tuple(dims) if all(d > 0 for d in dims) else None
            if shape is not None:
                params[out.name] = shape
    return params


@dataclass
class _Scope:
    """What may join a region: frozen nodes always; trainable ones with `tile_trainable`."""

    trainable: set[str]
    trainable_convs: set[str]
    filtered: set[str]  # gradient filtering rewrites one ConvGrad per conv; a tiled conv has one per band
    params: dict[str, tuple[int, ...]]
    tile_trainable: bool


def _trainable_tensors(graph: gs.Graph, plan: Plan) -> set[str]:
    """Names of tensors that depend on a trainable parameter (forward propagation)."""
    dependent = set(plan.trainable_params)
    for node in graph.nodes:
        if any(t is not None and t.name in dependent for t in node.inputs):
            dependent.update(t.name for t in node.outputs)
    return dependent


def _shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


@dataclass
class _Region:
    """Nodes grown from an entry tensor, and the cut points (single live tensor) along the way."""

    entry: gs.Variable
    infos: list[_OpInfo]
    cuts: list[tuple[int, gs.Variable]]  # (number of nodes before the cut, the cut tensor)
    shapes: dict[str, tuple[int, int, int, int]]


def _grow(graph: gs.Graph, start: int, entry: gs.Variable, scope: _Scope, claimed: set[int]) -> _Region:
    entry_shape = _shape(entry)
    region = _Region(entry, [], [(0, entry)], {})
    if entry_shape is None or len(entry_shape) != 4:
        return region
    region.shapes[entry.name] = entry_shape  # type: ignore[assignment]
    produced = {entry.name}
    inside: set[int] = set()
    outputs = {t.name for t in graph.outputs}
    readers: dict[str, int] = {}  # chain tensor -> readers not yet inside
    for node in graph.nodes[start:]:
        reads = [t for t in node.inputs if t is not None and t.name in produced]
        if not reads:
            continue
        touches_interior = any(t.name != entry.name for t in reads)
        info = None
        trainable_conv = node.name in scope.trainable_convs
        filtered = node.name in scope.filtered
        banded = bool(_BAND_NODE.match(node.name or ""))  # tiled already (the pass ran before)
        if (
            id(node) not in claimed
            and node.outputs
            and not filtered
            and not banded
            and (scope.tile_trainable or not trainable_conv)
        ):
            frozen = not any(t is not None and t.name in scope.trainable for t in node.inputs)
            allowed = frozen or scope.tile_trainable
            data = reads[0]
            shape = region.shapes[data.name]
            if allowed and node.op in _WINDOW_OPS and node.inputs[0].name in produced:
                info = _window_info(node, shape)
            elif allowed and (node.op in _POINTWISE_UNARY or node.op in _POINTWISE_BINARY):
                info = _pointwise_info(node, produced, shape, scope.params if scope.tile_trainable else None)
                if info is not None and any(region.shapes[node.inputs[s].name] != shape for s in info.data_slots):
                    info = None
        if info is None:
            if touches_interior:
                break  # a tensor inside would have a reader outside: the region ends here
            continue  # another reader of the entry only: the entry is materialized anyway
        out_shape = _out_shape(info, region.shapes[node.inputs[info.data_slots[0]].name])
        declared = _shape(node.outputs[0])
        if out_shape is None or (declared is not None and declared != out_shape):
            if touches_interior:
                break
            continue
        info.trainable = not frozen
        region.infos.append(info)
        inside.add(id(node))
        out = node.outputs[0]
        region.shapes[out.name] = out_shape
        produced.add(out.name)
        readers[out.name] = len(out.outputs)
        for name in {t.name for t in reads} - {entry.name}:
            readers[name] -= sum(1 for t in node.inputs if t is not None and t.name == name)
        live = [name for name, count in readers.items() if count > 0 or name in outputs]
        if live == [out.name]:
            region.cuts.append((len(region.infos), out))
    return region


def _out_shape(info: _OpInfo, in_shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    n, c, h, w = in_shape
    if not info.window:
        return (n, c, h, w)
    try:
        h_out, w_out = info.row.output_height(h), info.width.output_height(w)
    except ValueError:
        return None
    return (n, info.out_channels or c, h_out, w_out)


def _chain(region: _Region, first: int, last: int) -> Chain:
    """The chain between cut `first` and cut `last` of a region."""
    begin, entry = region.cuts[first]
    end, exit_tensor = region.cuts[last]
    infos = region.infos[begin:end]
    ids = {entry.name: 0}
    heights = [region.shapes[entry.name][2]]
    nodes = []
    for info in infos:
        out = info.node.outputs[0].name
        ids[out] = len(heights)
        heights.append(region.shapes[out][2])
        inputs = tuple(ids[info.node.inputs[slot].name] for slot in info.data_slots)
        nodes.append(RowNode(info.row, inputs, ids[out]))
    geometry = RowGraph(tuple(heights), tuple(nodes), ids[exit_tensor.name])
    shapes = {name: region.shapes[name] for name in ids}
    return Chain(entry, exit_tensor, infos, geometry, shapes, ids)


def _is_exit(region: _Region, last: int, chain: Chain) -> bool:
    """Cut `last` may end a chain: the op before it shrinks the tensor (a pool, a stride, a channel
    projection) and the exit is clearly smaller than the chain's largest intermediate."""
    size = chain.tensor_bytes(chain.exit.name)
    before = 4 * math.prod(region.shapes[region.cuts[last - 1][1].name])
    interior = [chain.tensor_bytes(op.node.outputs[0].name) for op in chain.ops if op.node.outputs[0] is not chain.exit]
    return size < before and bool(interior) and size <= MAX_EXIT_RATIO * max(interior)


def tiles_trainable(plan: Plan) -> bool:
    """Whether trainable layers are tiled too: `plan.row_tile_trainable` (default False).

    Tiled trainable layers need the training-stage pass `row_recompute`, which recomputes
    each band's forward inside the backward; without it every band's activations stay alive
    until the backward and tiling saves nothing there.
    """
    return bool(getattr(plan, "row_tile_trainable", False))


def find_regions(graph: gs.Graph, plan: Plan) -> list[_Region]:
    """Maximal regions of row-local ops (frozen ones; trainable ones too if `tiles_trainable`), in graph order."""
    graph.toposort()
    scope = _Scope(
        trainable=_trainable_tensors(graph, plan),
        trainable_convs=set(plan.trainable_convs),
        filtered=set(plan.filtered),
        params=_parameter_tensors(graph),
        tile_trainable=tiles_trainable(plan),
    )
    claimed: set[int] = set()
    regions = []
    for position, node in enumerate(graph.nodes):
        if id(node) in claimed or not node.inputs or node.inputs[0] is None:
            continue
        if node.op not in _WINDOW_OPS and node.op not in _POINTWISE_UNARY and node.op not in _POINTWISE_BINARY:
            continue
        if _BAND_NODE.match(node.name or ""):
            continue
        entry = node.inputs[0]
        if isinstance(entry, gs.Constant):
            continue
        region = _grow(graph, position, entry, scope, claimed)
        used = region.cuts[-1][0]
        if used == 0:
            continue
        region.infos = region.infos[:used]
        claimed.update(id(info.node) for info in region.infos)
        regions.append(region)
    return regions


def select_chains(graph: gs.Graph, plan: Plan, bands: int | None = None, strategy: str | None = None) -> list[Chain]:
    """The chains the pass tiles, each with its own band count (`Chain.bands`).

    Boundaries: along each region, a dynamic program over the exit cuts (see `_is_exit`)
    splits the region into tiled chains and untiled stretches so that the largest estimated
    peak (`chain_peak_bytes`) is smallest; among splits within 1% of that peak it takes the
    least OverL recompute, then the fewest chains. A tiled chain needs at least `bands`
    output rows; an OverL chain that spans several exits must keep its recompute within
    MAX_OVERL_RECOMPUTE ("re-partitioning" long chains where halos would grow).

    Band counts: the chain that sets the peak gets `bands`; every other chain uses the
    fewest bands (or none) that keep its own peak under that target, so smaller chains do
    not pay halo recompute and Slice/Concat copies for nothing.
    """
    bands = plan.row_tiles if bands is None else bands
    strategy = plan.row_strategy if strategy is None else strategy
    chains: list[Chain] = []
    for region in find_regions(graph, plan):
        chains.extend(_split_region(region, bands, strategy))
    if not chains:
        return []
    peaks = [chain_peak_bytes(chain, bands, chain.strategy) for chain in chains]
    target = max(peaks)
    selected = []
    for chain, peak in zip(chains, peaks, strict=True):
        if peak == target:
            chain.bands = bands
        elif chain_peak_bytes(chain, 1, chain.strategy) <= target:
            continue
        else:
            chain.bands = next(k for k in range(2, bands + 1) if chain_peak_bytes(chain, k, chain.strategy) <= target)
        selected.append(chain)
    return selected


def candidate_chains(graph: gs.Graph, plan: Plan, bands: int) -> list[Chain]:
    """Every shortest tileable chain (between consecutive exit cuts) with at least `bands` output rows.

    Each gets `Chain.bands = bands`. `select_chains` picks among longer and shorter ones;
    this list is for tests and tools that want every tileable op rewritten.
    """
    chains = []
    for region in find_regions(graph, plan):
        stops = _stops(region)
        for a, b in zip(stops, stops[1:], strict=False):
            chain = _chain(region, a, b)
            if chain.geometry.out_height >= bands and _is_exit(region, b, chain):
                chain.bands = bands
                chains.append(chain)
    return chains


def _stops(region: _Region) -> list[int]:
    """Cut indices where a chain may start or end: the entry, every shrinking cut, the last cut."""
    last = len(region.cuts) - 1
    size = [math.prod(region.shapes[cut.name]) for _, cut in region.cuts]
    return [0] + [i for i in range(1, last + 1) if i == last or size[i] < size[i - 1]]


def _split_region(region: _Region, bands: int, strategy: str) -> list[Chain]:
    """The tiled chains of the best split of one region (see select_chains)."""
    last = len(region.cuts) - 1
    stops = _stops(region)
    whole = _chain(region, 0, last)
    unit = max(1, chain_peak_bytes(whole, 1, strategy) // 100)  # peaks within 1% tie
    # best[b] = (quantized peak, recompute, chains, peak, chosen chains) over cuts [0, b]
    best: dict[int, tuple[int, float, int, int, list[Chain]]] = {0: (0, 0.0, 0, 0, [])}
    for b in stops[1:]:
        options = []
        for a in (stop for stop in stops if stop < b and stop in best):
            q_prev, extra_prev, count_prev, peak_prev, chosen = best[a]
            chain = _chain(region, a, b)
            untiled = chain_peak_bytes(chain, 1, strategy)
            peak = max(peak_prev, untiled)
            options.append((max(q_prev, -(-untiled // unit)), extra_prev, count_prev, peak, chosen))
            if chain.geometry.out_height < bands or not _is_exit(region, b, chain):
                continue
            chain.strategy = strategy  # type: ignore[assignment]
            extra = 0.0
            if chain.strategy == "overl":
                extra = recompute_overhead(schedule(chain.geometry, bands, "overl"), chain.row_costs())
                spans = sum(1 for stop in stops if a < stop < b)
                if spans and extra > MAX_OVERL_RECOMPUTE:
                    continue
            tiled = chain_peak_bytes(chain, bands, chain.strategy)
            options.append(
                (
                    max(q_prev, -(-tiled // unit)),
                    extra_prev + extra,
                    count_prev + 1,
                    max(peak_prev, tiled),
                    [*chosen, chain],
                )
            )
        if options:
            best[b] = min(options, key=lambda option: option[:3])
    return best[last][4] if last in best else []


def chain_peak_bytes(chain: Chain, bands: int, strategy: str = "overl") -> int:
    """Estimated peak live bytes while the chain runs: its entry, the finished exit rows and one band.

    A tensor lives from its producer to its last reader (the exit until the end); a band's
    tensors hold `rows x bytes per row`. `bands == 1` is the untiled chain. The final Concat
    holds the band pieces and the exit at once.
    """
    geometry = chain.geometry
    names = {i: name for name, i in chain.tensor_ids.items()}
    row_bytes = {t: chain.tensor_bytes(names[t]) // geometry.heights[t] for t in names}
    last_reader: dict[int, int] = {}
    for index, node in enumerate(geometry.nodes):
        for t in node.inputs:
            last_reader[t] = index
    entry = row_bytes[0] * geometry.heights[0]
    exit_bytes = row_bytes[geometry.exit] * geometry.heights[geometry.exit]

    def walk(rows: dict[int, Rows | None], resident: int) -> int:
        # Band tensors of one pass over the nodes; the entry is accounted for in `resident`.
        live: dict[int, int] = {}
        peak = resident
        for index, node in enumerate(geometry.nodes):
            held = rows.get(node.output)
            if held is not None and node.output != geometry.exit:
                live[node.output] = (held[1] - held[0]) * row_bytes[node.output]
            out = rows.get(node.output)
            step = (out[1] - out[0]) * row_bytes[node.output] if node.output == geometry.exit and out else 0
            peak = max(peak, resident + sum(live.values()) + step)
            for t in node.inputs:
                if last_reader[t] == index and t in live:
                    del live[t]
        return peak

    if bands <= 1:
        return walk({t: (0, geometry.heights[t]) for t in names}, entry)
    plan = schedule(geometry, bands, strategy)  # type: ignore[arg-type]
    peak, done = 0, 0
    for j in range(bands):
        carried = sum(
            (rows[1] - rows[0]) * row_bytes[t]
            for t in names
            if t not in (0, geometry.exit) and (rows := plan.carried(j, t)) is not None
        )
        entry_rows = plan.held[j][0]
        entry_band = (entry_rows[1] - entry_rows[0]) * row_bytes[0] if entry_rows else 0
        peak = max(peak, walk(plan.held[j], entry + done + carried + entry_band))
        out = plan.new[j][geometry.exit]
        done += (out[1] - out[0]) * row_bytes[geometry.exit] if out else 0
    return max(peak, 2 * exit_bytes)


def max_row_tiles(graph: gs.Graph, plan: Plan) -> int:
    """The largest K the first tileable chain of the frozen prefix allows (its output height); 0 if none."""
    for region in find_regions(graph, plan):
        for last in range(1, len(region.cuts)):
            chain = _chain(region, 0, last)
            if _is_exit(region, last, chain):
                return chain.geometry.out_height
    return 0


# --------------------------------------------------------------------------------------------
# Emitting the banded graph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Band:
    """A tensor that holds rows [lo, hi) of a chain tensor."""

    tensor: gs.Tensor
    lo: int
    hi: int


class _Emitter:
    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self._ints: dict[tuple[int, ...], gs.Constant] = {}

    def ints(self, values: Sequence[int]) -> gs.Constant:
        key = tuple(int(v) for v in values)
        if key not in self._ints:
            name = f"{self.prefix}/i64_{'_'.join(str(v) for v in key).replace('-', 'm')}"
            self._ints[key] = gs.Constant(name, np.array(key, dtype=np.int64))
        return self._ints[key]

    def op(
        self,
        op: str,
        name: str,
        inputs: list[gs.Tensor],
        shape: Sequence[int] | None,
        dtype=np.float32,
        attrs: dict | None = None,
        domain: str | None = None,
    ) -> gs.Variable:
        out = gs.Variable(f"{self.prefix}/{name}", dtype=dtype, shape=list(shape) if shape is not None else None)
        node = gs.Node(op=op, name=f"{self.prefix}/{name}", attrs=dict(attrs or {}), inputs=inputs, outputs=[out])
        if domain:
            node.domain = domain
        self.graph.nodes.append(node)
        return out

    def rows(self, band: _Band, start: int, stop: int, name: str, shape: tuple[int, ...]) -> gs.Tensor:
        """Rows [start, stop) of a chain tensor out of a band that holds them."""
        assert band.lo <= start < stop <= band.hi, (band.lo, band.hi, start, stop, name)
        if (start, stop) == (band.lo, band.hi):
            return band.tensor
        n, c, _, w = shape
        inputs = [band.tensor, self.ints([start - band.lo]), self.ints([stop - band.lo]), self.ints([2])]
        return self.op("Slice", name, inputs, (n, c, stop - start, w))


def _band_op(em: _Emitter, chain: Chain, op: _OpInfo, inputs: dict[int, _Band], rows: Rows, tag: str) -> gs.Variable:
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
        have = _clip(want, height)
        band = inputs[chain.tensor_ids[source]]
        new_inputs[0] = em.rows(band, have[0], have[1], f"{tag}/{base}/rows", chain.shapes[source])
        pads = _auto_pads(node, chain.shapes[source][2:], *_kernel_strides_dilations(node))
        assert pads is not None
        right = pads[3]
        if op.width.ceil_mode:
            # ceil_mode is dropped (rows are exact per band), so a ceil-mode pool's last column
            # window is kept by padding the right instead: MaxPool ignores pad values.
            w_in, w_out = chain.shapes[source][3], chain.shapes[out_name][3]
            right = max(right, op.width.input_rows(0, w_out)[1] - w_in)
        attrs["pads"] = [have[0] - want[0], pads[1], want[1] - have[1], right]
        attrs.pop("auto_pad", None)
        if node.op != "Conv":
            attrs["ceil_mode"] = 0
    else:
        for slot in op.data_slots:
            source = node.inputs[slot].name
            band = inputs[chain.tensor_ids[source]]
            new_inputs[slot] = em.rows(band, rows[0], rows[1], f"{tag}/{base}/in{slot}", chain.shapes[source])
    dtype = node.outputs[0].dtype or np.float32
    return em.op(node.op, f"{tag}/{base}", new_inputs, (n, c, rows[1] - rows[0], w), dtype, attrs, node.domain)


def _kernel_strides_dilations(node: gs.Node) -> tuple[list[int], list[int], list[int]]:
    if node.op == "Conv":
        kernel = _ints(node, "kernel_shape", node.inputs[1].values.shape[2:])
    else:
        kernel = _ints(node, "kernel_shape", ())
    return kernel, _ints(node, "strides", (1, 1)), _ints(node, "dilations", (1, 1))


def _finish(chain: Chain, em: _Emitter, pieces: list[gs.Tensor]) -> None:
    """Concatenate the bands into the chain's exit tensor and detach the original nodes."""
    for op in chain.ops:
        op.node.outputs.clear()
        op.node.inputs.clear()
    node = gs.Node(op="Concat", name=f"{em.prefix}/concat", attrs={"axis": 2}, inputs=pieces, outputs=[chain.exit])
    em.graph.nodes.append(node)


def tile_chain(graph: gs.Graph, chain: Chain, bands: int, strategy: Strategy) -> BandSchedule:
    """Rewrite one chain into `bands` row bands in place; returns the schedule it used."""
    plan = schedule(chain.geometry, bands, strategy)
    em = _Emitter(graph, f"rowtile/{chain.name}")
    names = {i: name for name, i in chain.tensor_ids.items()}
    entry_shape = chain.shapes[chain.entry.name]
    entry_band = _Band(chain.entry, 0, chain.geometry.heights[0])
    pieces: list[gs.Tensor] = []
    if strategy == "overl":
        read = [0, *(node.output for node in chain.geometry.nodes)]
        empty = [j for j in range(bands) if any(plan.held[j].get(t) is None for t in read)]
        if empty:
            # A conv padding beyond its kernel's reach (e.g. 1x1 with pad 1) makes whole output rows
            # pure padding, so a band made only of them reads no input rows at all.
            raise ValueError(
                f"chain {chain.name!r}: band {empty[0]} of {bands} would read no input rows (a conv pads "
                "beyond what its kernel reads); use fewer --row-tiles"
            )
        for j in range(bands):
            tag = f"band{j}"
            x_rows = plan.held[j][0]
            assert x_rows is not None
            held = {0: _Band(em.rows(entry_band, *x_rows, f"{tag}/entry", entry_shape), *x_rows)}
            for op, row_node in zip(chain.ops, chain.geometry.nodes, strict=True):
                rows = plan.held[j][row_node.output]
                assert rows is not None
                held[row_node.output] = _Band(_band_op(em, chain, op, held, rows, tag), *rows)
            pieces.append(held[chain.geometry.exit].tensor)
        _finish(chain, em, pieces)
        return plan

    previous: dict[int, _Band] = {}
    after: list[gs.Tensor] = []  # the last tensors of the previous band (see _after)
    for j in range(bands):
        tag = f"band{j}"
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
                n, c, _, w = chain.shapes[names[t]]
                shape = (n, c, rows[1] - rows[0], w)
                held[t] = _Band(em.op("Concat", f"{tag}/{names[t]}/held", parts, shape, attrs={"axis": 2}), *rows)
        # What band j+1 takes over, sliced now so that band j's tensors die with band j.
        previous = {}
        after = [pieces[-1]] if pieces else []
        if j + 1 < bands:
            for t, band in held.items():
                if t == 0:
                    continue
                carried = plan.carried(j + 1, t)
                if carried is not None:
                    tensor = em.rows(band, *carried, f"{tag}/{names[t]}/carry", chain.shapes[names[t]])
                    previous[t] = _Band(tensor, *carried)
                    after.append(tensor)
    _finish(chain, em, pieces)
    return plan


def _entry_rows(
    em: _Emitter, entry: gs.Tensor, shape: tuple[int, ...], rows: Rows, after: list[gs.Tensor], band: int
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
    tag = f"band{band}"
    if not after:
        inputs = [entry, em.ints([rows[0]]), em.ints([rows[1]]), em.ints([2])]
        return em.op("Slice", f"{tag}/entry", inputs, (n, c, rows[1] - rows[0], w))
    done = f"band{band - 1}/done"
    empties = []
    for index, tensor in enumerate(after):
        empty = em.op("Slice", f"{done}{index}", [tensor, em.ints([0]), em.ints([0]), em.ints([0])], None)
        empties.append(em.op("Reshape", f"{done}{index}/flat", [empty, em.ints([0])], (0,)))
    joined = empties[0] if len(empties) == 1 else em.op("Concat", done, empties, (0,), attrs={"axis": 0})
    edge = em.op("Cast", f"{done}/i64", [joined], (0,), np.int64, {"to": onnx.TensorProto.INT64})
    starts = em.op("Concat", f"{tag}/entry/starts", [em.ints([rows[0]]), edge], (1,), np.int64, {"axis": 0})
    inputs = [entry, starts, em.ints([rows[1]]), em.ints([2])]
    return em.op("Slice", f"{tag}/entry", inputs, (n, c, rows[1] - rows[0], w))


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Tile every selected chain of the frozen prefix into `plan.row_tiles` row bands."""
    # The pass runner prefixes errors with the pass name, so messages here do not.
    bands = plan.row_tiles
    if isinstance(bands, bool) or not isinstance(bands, int | np.integer) or bands < 0:
        raise ValueError(f"--row-tiles must be an integer >= 2 (0: no tiling), got {bands!r}")
    if bands <= 1:
        return graph
    if plan.row_strategy not in STRATEGIES:
        raise ValueError(f"unknown row strategy {plan.row_strategy!r}; choose one of {', '.join(STRATEGIES)}")
    limit = max_row_tiles(graph, plan)
    if limit and bands > limit:
        raise ValueError(
            f"--row-tiles {bands} is more than the {limit} output rows of the first tileable conv chain "
            f"(every band needs at least one); use --row-tiles <= {limit}"
        )
    chains = select_chains(graph, plan, bands, plan.row_strategy)
    if not chains:
        _LOG.warning("row tiling: no conv chain that ends at a pool or stride (or it is trainable); nothing tiled")
        return graph
    for chain in chains:
        tile_chain(graph, chain, chain.bands, chain.strategy)
        plan.generated.chain_scopes[chain.name] = f"rowtile/{chain.name}"
        _LOG.info(
            "row tiling: %s %s -> %s in %d bands (%d ops)",
            chain.strategy,
            chain.entry.name,
            chain.exit.name,
            chain.bands,
            len(chain.ops),
        )
    graph.cleanup()
    return graph


# --------------------------------------------------------------------------------------------
# Memory estimate and --memory-budget
# --------------------------------------------------------------------------------------------

# Ops whose output ORT's allocation planner may write into a dying input of the same size.
_IN_PLACE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Mul", "Sub", "Div"}


def ort_default_order(nodes: Sequence[gs.Node]) -> list[gs.Node]:
    """The order ORT's default execution plan runs `nodes` in (GraphViewer's reverse DFS).

    From the leaf nodes (no consumer), visit inputs depth-first, the producer with the
    highest node index first, and emit a node once all its inputs are emitted. Node indices
    are file positions, which the pass runner sets by `toposort()` (sorted by depth level).
    """
    index = {id(node): i for i, node in enumerate(nodes)}
    producers: dict[int, list[gs.Node]] = {}
    consumed: set[int] = set()
    for node in nodes:
        inputs = []
        for tensor in node.inputs:
            if tensor is None:
                continue
            for producer in tensor.inputs:
                if id(producer) in index and producer not in inputs:
                    inputs.append(producer)
                    consumed.add(id(producer))
        producers[id(node)] = sorted(inputs, key=lambda n: index[id(n)])
    stack: list[tuple[gs.Node, bool]] = [(node, False) for node in nodes if id(node) not in consumed]
    visited: set[int] = set()
    order: list[gs.Node] = []
    while stack:
        node, leave = stack.pop()
        if leave:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in producers[id(node)] if id(p) not in visited)
    return order


def _level_sorted(graph: gs.Graph) -> list[gs.Node]:
    """Node order after the pass runner's `toposort()` (stable sort by depth level), without mutating."""
    level: dict[int, int] = {}
    ids = {id(node) for node in graph.nodes}
    for node in _topological(graph.nodes):
        level[id(node)] = 1 + max(
            (level[id(p)] for t in node.inputs if t is not None for p in t.inputs if id(p) in ids), default=-1
        )
    return sorted(graph.nodes, key=lambda node: level[id(node)])


def _topological(nodes: Sequence[gs.Node]) -> list[gs.Node]:
    ids = {id(node) for node in nodes}
    done: set[int] = set()
    order = []
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, leave = stack.pop()
            if leave:
                if id(node) not in done:
                    done.add(id(node))
                    order.append(node)
                continue
            if id(node) in done:
                continue
            stack.append((node, True))
            for t in node.inputs:
                if t is not None:
                    stack.extend((p, False) for p in t.inputs if id(p) in ids and id(p) not in done)
    return order


def _nbytes(tensor: gs.Tensor) -> int:
    shape = _shape(tensor)
    if shape is None:
        return 0
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    return int(math.prod(shape)) * dtype.itemsize


def estimate_peak_bytes(graph: gs.Graph, plan: Plan | None = None) -> int:
    """Estimated peak bytes of live activations of one training step's forward, in ORT's default order.

    Counts the data inputs, every intermediate from its producer to its last reader (ops
    like Relu/Add reuse a dying input of the same size, as ORT's planner does), and keeps
    alive to the end the tensors the backward will read: inputs and outputs of nodes that
    depend on a trainable parameter of `plan`. When trainable layers are tiled, band tensors
    are not saved (row_recompute recomputes them) and one band's recomputed activations
    come on top of what is saved. Weights, weight
    gradients and kernel scratch buffers are not counted; tensors without a static shape
    count 0. An estimate for choosing K, not a measurement.
    """
    order = ort_default_order(_level_sorted(graph))
    trainable = _trainable_tensors(graph, plan) if plan is not None else set()
    position = {id(node): i for i, node in enumerate(order)}
    outputs = {t.name for t in graph.outputs}
    last_use: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for node in order:
        for t in node.inputs:
            if t is not None and t.name and not isinstance(t, gs.Constant):
                last_use[t.name] = position[id(node)]
                sizes[t.name] = _nbytes(t)
        for t in node.outputs:
            sizes[t.name] = _nbytes(t)
    kept = set(outputs)
    # With trainable tiling, row_recompute recomputes band tensors inside the backward: only
    # the chain entries and exits (not produced by band nodes) are saved.
    recomputed = plan is not None and tiles_trainable(plan)
    for node in order:
        if any(t is not None and t.name in trainable for t in node.inputs):
            for t in [*node.inputs, *node.outputs]:
                if t is None or isinstance(t, gs.Constant):
                    continue
                if recomputed and t.inputs and _BAND_NODE.match(t.inputs[0].name or ""):
                    continue
                kept.add(t.name)
    live = {t.name: _nbytes(t) for t in graph.inputs}
    peak = sum(live.values())
    for i, node in enumerate(order):
        dying = [
            t.name
            for t in node.inputs
            if t is not None and t.name in live and last_use.get(t.name) == i and t.name not in kept
        ]
        reused = None
        if node.op in _IN_PLACE and node.outputs:
            size = sizes.get(node.outputs[0].name, 0)
            reused = next((name for name in dying if sizes.get(name) == size and size), None)
        for t in node.outputs:
            if reused is not None and t is node.outputs[0]:
                live[t.name] = live.pop(reused)
            else:
                live[t.name] = sizes.get(t.name, 0)
        peak = max(peak, sum(live.values()))
        for name in dying:
            live.pop(name, None)
        for t in node.outputs:
            if t.name not in last_use and t.name not in kept:
                live.pop(t.name, None)
    if recomputed:
        # The backward of a tiled trainable chain holds, on top of what the forward saved, one
        # band's recomputed activations, whose gradients replace them as it goes. Against the
        # measured step peak of VGG-16-BN with every conv trained (224x224, batch 8): untiled
        # 0%, OverL +29/+27/-11% and 2PS +41/+21/+4% at K = 2/4/8 (it counts every band
        # output, also those the backward does not read). Backward-only tensors outside tiled
        # chains are not modelled: DeepLabV3 at 512x512 is under by 47%, tiled or not.
        bands: dict[tuple[str, str], int] = {}
        for node in order:
            match = _BAND_NODE.match(node.name or "")
            if match and any(t is not None and t.name in trainable for t in node.inputs):
                key = (match.group(1), match.group(2))
                bands[key] = bands.get(key, 0) + sum(sizes.get(t.name, 0) for t in node.outputs)
        if bands:
            peak = max(peak, sum(live.values()) + max(bands.values()))
    return peak


def _tiled_copy(graph: gs.Graph, plan: Plan, bands: int, strategy: str) -> gs.Graph:
    copy = graph.copy()
    if bands >= 2:
        for chain in select_chains(copy, plan, bands, strategy):
            tile_chain(copy, chain, chain.bands, chain.strategy)
        copy.cleanup()
    return copy


def peak_by_tiles(graph: gs.Graph, plan: Plan, tiles: Iterable[int], strategy: str | None = None) -> dict[int, int]:
    """Estimated peak bytes (see estimate_peak_bytes) for each K in `tiles` (0 or 1: untiled)."""
    strategy = plan.row_strategy if strategy is None else strategy
    return {k: estimate_peak_bytes(_tiled_copy(graph, plan, k, strategy), plan) for k in tiles}


def _mib(size_bytes: float) -> str:
    """MiB for messages; budgets of tiny test models are fractions of a MiB."""
    mib = size_bytes / MIB
    return f"{mib:.1f}" if mib >= 1 else f"{mib:.2g}"


def smallest_feasible_tiles(peaks: dict[int, int], budget_bytes: float) -> int:
    """The smallest K whose estimated peak fits `budget_bytes` (0: no tiling needed); ValueError if none."""
    fitting = sorted(k for k, peak in peaks.items() if peak <= budget_bytes)
    if fitting:
        return 0 if fitting[0] <= 1 else fitting[0]
    best = min(peaks, key=lambda k: (peaks[k], k))
    raise ValueError(
        f"a memory budget of {_mib(budget_bytes)} MiB cannot be met: the smallest estimated peak is "
        f"{_mib(peaks[best])} MiB (at --row-tiles {best}); use --memory-budget {math.ceil(peaks[best] / MIB)} "
        "or more, or train fewer layers"
    )


def tiles_for_budget(
    model: gs.Graph | onnx.ModelProto, plan: Plan, budget_mb: float, strategy: str | None = None
) -> int:
    """The smallest K (0 = untiled) whose estimated peak activation memory fits `budget_mb` MiB.

    `model` is the forward graph after the other forward passes. Tries K = 2, 4, 8, ... up to
    the largest K the first chain allows, then bisects between the last two powers of two
    (the estimate falls with K up to where entry and exit tensors dominate). ValueError,
    naming the smallest budget that can be met, when none fits.
    """
    graph = gs.import_onnx(model) if isinstance(model, onnx.ModelProto) else model
    budget = float(budget_mb) * MIB
    if budget <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_mb} MiB")
    peaks = peak_by_tiles(graph, plan, [0], strategy)
    if peaks[0] <= budget:
        return 0
    limit = max_row_tiles(graph, plan)
    if limit < 2:
        raise ValueError(
            f"a memory budget of {budget_mb} MiB cannot be met: the estimated peak is {_mib(peaks[0])} MiB "
            "and the frozen layers have no conv chain that row tiling can split"
        )
    k = 2
    while True:
        peaks.update(peak_by_tiles(graph, plan, [k], strategy))
        if peaks[k] <= budget or k == limit:
            break
        k = min(2 * k, limit)
    if peaks[k] > budget:
        return smallest_feasible_tiles(peaks, budget)  # raises, naming the best reachable peak
    low, high = max(k // 2, 1), k  # low does not fit (or is untiled), high fits
    while high - low > 1:
        mid = (low + high) // 2
        peaks.update(peak_by_tiles(graph, plan, [mid], strategy))
        low, high = (low, mid) if peaks[mid] <= budget else (mid, high)
    return high


def required_session_options(plan: Plan) -> dict:
    """Session options the artifacts need (the manifest's "session_options").

    ORT's default order (a reverse DFS from the outputs) runs OverL bands depth-first because
    each band is its own subtree of the Concat, and 2PS bands in sequence because of the
    explicit data edge between bands; so no PRIORITY_BASED order (which only holds at
    ORT_ENABLE_BASIC and costs 50-70% time) is needed. With tiling, the CPU arena is off (it
    keeps the high-water mark of differently sized band buffers reserved) and so is ORT's
    memory pattern (its one-block layout of all planned buffers fragments with many band
    tensors: measured 194 MiB instead of 143 MiB for a VGG-16 training step at K=8), and so
    is its buffer reuse: the planner hands a freed buffer to a later tensor of the same
    size, and keeps it allocated in between, so equally sized bands of one chain all stay
    allocated until the last one (VGG-16 training step at K=8: 76 MiB with reuse, 51 without).
    """
    tiled = plan.applied_row_tiles >= 2
    return {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_order": "DEFAULT",
        "enable_cpu_mem_arena": not tiled,
        "enable_mem_pattern": not tiled,
        "enable_mem_reuse": not tiled,
    }


__all__ = [
    "FACTS",
    "MAX_EXIT_RATIO",
    "MAX_OVERL_RECOMPUTE",
    "REQUIRES",
    "STAGE",
    "BandSchedule",
    "Chain",
    "RowGraph",
    "RowNode",
    "RowOp",
    "band_plan",
    "candidate_chains",
    "chain_peak_bytes",
    "estimate_peak_bytes",
    "ort_default_order",
    "peak_by_tiles",
    "smallest_feasible_tiles",
    "tiles_for_budget",
    "find_regions",
    "max_row_tiles",
    "output_splits",
    "recompute_overhead",
    "required_session_options",
    "run",
    "schedule",
    "select_chains",
    "tile_chain",
]
