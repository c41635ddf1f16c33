"""Row-band geometry of a conv chain on the H axis: pure functions, no graph. Not a pass.

Which input rows each op's output rows read (`RowOp`), a chain as a DAG of such ops
(`RowGraph`), and the rows every band holds and computes under the OverL and 2PS strategies
(`schedule`, `band_plan`); see `passes.row_tiling` for the method.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["overl", "2ps"]
STRATEGIES: tuple[str, ...] = ("overl", "2ps")


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


def clip_rows(rows: Rows, height: int) -> Rows:
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
                    clip_rows(node.op.input_rows(*rows[node.output]), geometry.heights[t])
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
                clip_rows(node.op.input_rows(0, end[node.output]), geometry.heights[t])[1]
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
                    first = min(first, clip_rows(node.op.input_rows(*rows), geometry.heights[t])[0])
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


def padding_only_reads(plan: BandSchedule) -> list[tuple[int, int]]:
    """(band, node index) wherever a band computes rows of a node whose input span is all padding.

    A conv padding beyond its kernel's reach (pad > dilation * (kernel - 1), e.g. a 1x1 conv
    with pad 1) has whole output rows that read no input row; a band whose rows of that node
    span only such padding has no input rows to slice, so it cannot be emitted as a band op.
    """
    found = []
    for j in range(plan.bands):
        for index, node in enumerate(plan.geometry.nodes):
            rows = plan.new[j][node.output]
            if rows is None:
                continue
            for t in node.inputs:
                read = clip_rows(node.op.input_rows(*rows), plan.geometry.heights[t])
                if read[1] <= read[0]:
                    found.append((j, index))
                    break
    return found


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
