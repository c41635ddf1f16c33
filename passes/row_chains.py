"""Finding tileable conv chains in a forward graph and choosing which to tile. Not a pass.

A region grows from an entry tensor over row-local ops (see `passes.row_tiling`); chains are
stretches of a region between cut points, and `select_chains` picks the chains and their
band counts with a small dynamic program over the estimated peak (`chain_peak_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, pass_logger
from .geometry import explicit_pads
from .names import parse_band
from .row_geometry import (
    STRATEGIES,
    BandSchedule,
    RowGraph,
    RowNode,
    RowOp,
    Rows,
    Strategy,
    padding_only_reads,
    recompute_overhead,
    schedule,
)

# OverL recomputes halo rows; a chain is not extended past a downsampling point when that
# would make the recomputed work (MAC-weighted) exceed this fraction of the chain's work.
MAX_OVERL_RECOMPUTE = 0.10
# A chain must end at a tensor at most this fraction of its largest intermediate, else
# tiling cannot lower the peak (the concatenated output is as large as what it replaces).
MAX_EXIT_RATIO = 0.75

_LOG = pass_logger("row_tiling")

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
_WINDOW_OPS = {"Conv", "MaxPool", "AveragePool"}


@dataclass
class OpInfo:
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
    ops: list[OpInfo]
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


def _window_info(node: gs.Node, in_shape: tuple[int, ...]) -> OpInfo | None:
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
    try:
        pads = explicit_pads(
            node.attrs.get("auto_pad"), _ints(node, "pads", (0, 0, 0, 0)), in_shape[2:], kernel, strides, dilations
        )
    except ValueError:
        return None
    if min(pads) < 0:
        return None
    ceil = bool(int(node.attrs.get("ceil_mode", 0))) if node.op != "Conv" else False
    row = RowOp(kernel[0], strides[0], dilations[0], pads[0], pads[2], ceil)
    width = RowOp(kernel[1], strides[1], dilations[1], pads[1], pads[3], ceil)
    return OpInfo(node, row, width, True, (0,), out_channels)


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
) -> OpInfo | None:
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
    return OpInfo(node, RowOp(), RowOp(), False, tuple(slots), None)


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
            shape = shape_of(out)
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
    chain_scopes: dict[str, str]  # chains tiled already (the pass ran before): their band nodes are left alone

    def banded(self, node: gs.Node) -> bool:
        return parse_band(node.name or "", self.chain_scopes) is not None


def trainable_tensors(graph: gs.Graph, plan: Plan) -> set[str]:
    """Names of tensors that depend on a trainable parameter (forward propagation)."""
    dependent = set(plan.trainable_params)
    for node in graph.nodes:
        if any(t is not None and t.name in dependent for t in node.inputs):
            dependent.update(t.name for t in node.outputs)
    return dependent


def shape_of(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


@dataclass
class _Region:
    """Nodes grown from an entry tensor, and the cut points (single live tensor) along the way."""

    entry: gs.Variable
    infos: list[OpInfo]
    cuts: list[tuple[int, gs.Variable]]  # (number of nodes before the cut, the cut tensor)
    shapes: dict[str, tuple[int, int, int, int]]
    ended_by: str = "the end of the graph"  # the node (and why) the region could not take in


def _grow(graph: gs.Graph, start: int, entry: gs.Variable, scope: _Scope, claimed: set[int]) -> _Region:
    entry_shape = shape_of(entry)
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
        banded = scope.banded(node)
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
                # A tensor inside would have a reader outside: the region ends here.
                region.ended_by = f"{node.name or node.op} ({_why_not_row_local(node, scope)})"
                break
            continue  # another reader of the entry only: the entry is materialized anyway
        out_shape = _out_shape(info, region.shapes[node.inputs[info.data_slots[0]].name])
        declared = shape_of(node.outputs[0])
        if out_shape is None or (declared is not None and declared != out_shape):
            if touches_interior:
                region.ended_by = f"{node.name or node.op} (its output shape does not follow from its rows)"
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


def _why_not_row_local(node: gs.Node, scope: _Scope) -> str:
    if node.name in scope.filtered:
        return "gradient-filtered"
    if scope.banded(node):
        return "tiled already"
    trainable = node.name in scope.trainable_convs or any(
        t is not None and t.name in scope.trainable for t in node.inputs
    )
    if trainable and not scope.tile_trainable:
        return "trained; --row-tile-trainable tiles trained layers"
    if node.op not in _WINDOW_OPS | _POINTWISE_UNARY | _POINTWISE_BINARY:
        return f"{node.op} is not row-local"
    return f"{node.op} with this geometry or these operands is not tileable"


def describe_regions(graph: gs.Graph, plan: Plan) -> list[str]:
    """One line per region of row-local ops: where it starts, how many ops, what ended it (for the pass log)."""
    return [
        f"{len(region.infos)} row-local ops from {region.entry.name}, ended by {region.ended_by}"
        for region in find_regions(graph, plan)
    ]


def _out_shape(info: OpInfo, in_shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
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


def padding_only_refusal(chain: Chain, plan: BandSchedule) -> str | None:
    """Why `chain` cannot be emitted with `plan`: a band whose rows of some conv read only padding.

    Such rows (a conv padding beyond its kernel's reach, e.g. 1x1 with pad 1) are constant, but a
    band made only of them has no input rows to run the op on; None when every band reads rows.
    """
    problems = padding_only_reads(plan)
    if not problems:
        return None
    band, index = problems[0]
    node = chain.ops[index].node
    return (
        f"chain {chain.name!r}: band {band} of {plan.bands} would read no input rows (a conv pads beyond "
        f"what its kernel reads: {node.op} {node.name or node.outputs[0].name!r}); use fewer --row-tiles"
    )


def _emittable(chain: Chain, bands: int, strategy: str) -> bool:
    """Whether `chain` can be tiled into `bands` bands (see `padding_only_refusal`); logs why not."""
    refusal = padding_only_refusal(chain, schedule(chain.geometry, bands, strategy))  # type: ignore[arg-type]
    if refusal:
        _LOG.info("not tiled in %d %s bands: %s", bands, strategy, refusal)
    return refusal is None


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
        trainable=trainable_tensors(graph, plan),
        trainable_convs=set(plan.trainable_convs),
        filtered=set(plan.filtered),
        params=_parameter_tensors(graph),
        tile_trainable=tiles_trainable(plan),
        chain_scopes=plan.generated.chain_scopes,
    )
    claimed: set[int] = set()
    regions = []
    for position, node in enumerate(graph.nodes):
        if id(node) in claimed or not node.inputs or node.inputs[0] is None:
            continue
        if node.op not in _WINDOW_OPS and node.op not in _POINTWISE_UNARY and node.op not in _POINTWISE_BINARY:
            continue
        if scope.banded(node):
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
            fits = (k for k in range(2, bands + 1) if chain_peak_bytes(chain, k, chain.strategy) <= target)
            chain.bands = next((k for k in fits if _emittable(chain, k, chain.strategy)), 0)
            if not chain.bands:
                continue
        selected.append(chain)
    return selected


def candidate_chains(graph: gs.Graph, plan: Plan, bands: int) -> list[Chain]:
    """Every shortest tileable chain (between consecutive exit cuts) with at least `bands` output rows,
    whose bands all have input rows under both strategies (see `padding_only_refusal`).

    Each gets `Chain.bands = bands`. `select_chains` picks among longer and shorter ones;
    this list is for tests and tools that want every tileable op rewritten.
    """
    chains = []
    for region in find_regions(graph, plan):
        stops = _stops(region)
        for a, b in zip(stops, stops[1:], strict=False):
            chain = _chain(region, a, b)
            if chain.geometry.out_height >= bands and _is_exit(region, b, chain):
                schedules = [schedule(chain.geometry, bands, strategy) for strategy in STRATEGIES]  # type: ignore[arg-type]
                if any(padding_only_refusal(chain, bands_of) for bands_of in schedules):
                    continue
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
            if not _emittable(chain, bands, strategy):
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
