"""The memory model of row tiling: ORT's execution order, peak activation bytes, --memory-budget. Not a pass.

Shared by the row_tiling pass (`tiles_for_budget` for `--memory-budget`), the pipeline
(`required_session_options`) and the benchmarks (`estimate_peak_bytes`, `peak_by_tiles`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Plan
from .names import BandNode, NameAllocator, parse_band
from .row_chains import max_row_tiles, select_chains, shape_of, tiles_trainable, trainable_tensors
from .row_emission import tile_chain

MIB = 1 << 20

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
    shape = shape_of(tensor)
    if shape is None:
        return 0
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    return int(math.prod(shape)) * dtype.itemsize


def estimate_peak_bytes(graph: gs.Graph, plan: Plan | None = None, chain_scopes: dict[str, str] | None = None) -> int:
    """Estimated peak bytes of live activations of one training step's forward, in ORT's default order.

    Counts the data inputs, every intermediate from its producer to its last reader (ops
    like Relu/Add reuse a dying input of the same size, as ORT's planner does), and keeps
    alive to the end the tensors the backward will read: inputs and outputs of nodes that
    depend on a trainable parameter of `plan`. When trainable layers are tiled, band tensors
    are not saved (row_recompute recomputes them) and one band's recomputed activations
    come on top of what is saved. Weights, weight
    gradients and kernel scratch buffers are not counted; tensors without a static shape
    count 0. An estimate for choosing K, not a measurement. Band nodes are those of
    `chain_scopes` (chain -> scope, as `tile_chain` reports), by default the chains the
    row_tiling pass tiled (`plan.generated.chain_scopes`).
    """
    if chain_scopes is None:
        chain_scopes = plan.generated.chain_scopes if plan is not None else {}
    order = ort_default_order(_level_sorted(graph))
    trainable = trainable_tensors(graph, plan) if plan is not None else set()
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
                if recomputed and t.inputs and parse_band(t.inputs[0].name or "", chain_scopes):
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
        bands: dict[BandNode, int] = {}
        for node in order:
            band = parse_band(node.name or "", chain_scopes)
            if band is not None and any(t is not None and t.name in trainable for t in node.inputs):
                bands[band] = bands.get(band, 0) + sum(sizes.get(t.name, 0) for t in node.outputs)
        if bands:
            peak = max(peak, sum(live.values()) + max(bands.values()))
    return peak


def _tiled_copy(graph: gs.Graph, plan: Plan, bands: int, strategy: str) -> tuple[gs.Graph, dict[str, str]]:
    """A copy of `graph` tiled as the pass would (the plan is not touched), and its chain scopes."""
    copy = graph.copy()
    scopes: dict[str, str] = {}
    if bands >= 2:
        names = NameAllocator(copy)
        for chain in select_chains(copy, plan, bands, strategy):
            scopes[chain.name] = tile_chain(copy, chain, chain.bands, chain.strategy, names).scope
        copy.cleanup()
    return copy, scopes


def peak_by_tiles(graph: gs.Graph, plan: Plan, tiles: Iterable[int], strategy: str | None = None) -> dict[int, int]:
    """Estimated peak bytes (see estimate_peak_bytes) for each K in `tiles` (0 or 1: untiled)."""
    strategy = plan.row_strategy if strategy is None else strategy
    peaks = {}
    for k in tiles:
        tiled, scopes = _tiled_copy(graph, plan, k, strategy)
        peaks[k] = estimate_peak_bytes(tiled, plan, scopes)
    return peaks


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
