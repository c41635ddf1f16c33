"""Row-band geometry (passes/row_geometry.py): pure functions, checked against a 1-D numpy reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

from passes.row_geometry import (
    RowGraph,
    RowNode,
    RowOp,
    band_plan,
    output_splits,
    padding_only_reads,
    recompute_overhead,
    schedule,
)

CONV3 = RowOp(kernel=3, stride=1, pad_top=1, pad_bottom=1)
POOL2 = RowOp(kernel=2, stride=2)


def test_row_op_maps_output_rows_to_the_input_rows_they_read() -> None:
    # Output row r of a k=3, s=2, pad-1 conv reads input rows [2r - 1, 2r + 2) (row -1 is padding).
    op = RowOp(kernel=3, stride=2, pad_top=1, pad_bottom=1)
    assert op.input_rows(0, 1) == (-1, 2) and op.input_rows(3, 5) == (5, 10)
    assert op.output_height(97) == (97 + 2 - 3) // 2 + 1
    dilated = RowOp(kernel=3, dilation=4, pad_top=4, pad_bottom=4)
    assert dilated.extent == 9 and dilated.input_rows(10, 11) == (6, 15) and dilated.output_height(20) == 20
    ceil_pool = RowOp(kernel=2, stride=2, ceil_mode=True)
    assert ceil_pool.output_height(7) == 4 and RowOp(kernel=2, stride=2).output_height(7) == 3
    with pytest.raises(ValueError, match="reads more rows"):
        RowOp(kernel=5).output_height(3)


def test_output_splits_are_even_and_cover_every_row() -> None:
    for height, bands in [(7, 3), (112, 8), (5, 5), (1, 1)]:
        splits = output_splits(height, bands)
        sizes = [b - a for a, b in zip(splits, splits[1:], strict=False)]
        assert splits[0] == 0 and splits[-1] == height and max(sizes) - min(sizes) <= 1


def test_band_plan_vgg_block_overl() -> None:
    bands = band_plan([CONV3, CONV3, POOL2], 224, 8, "overl")
    assert [b[2:] for b in bands] == [(14 * j, 14 * j + 14) for j in range(8)]
    # Each band reads its 28 core rows plus a 2-row halo on each side that is inside the image.
    assert bands[0][:2] == (0, 30)
    assert bands[3][:2] == (3 * 28 - 2, 4 * 28 + 2)
    assert bands[7][:2] == (7 * 28 - 2, 224)


def test_band_plan_2ps_reads_each_row_once_plus_the_shared_rows() -> None:
    bands = band_plan([CONV3, CONV3, POOL2], 224, 8, "2ps")
    # Output rows are split so that each band gets ~28 new entry rows: band 0 ends at entry
    # row 2 * 13 + 2 = 28 (13 pooled rows, then the two convs' halo), the others follow.
    assert [b[2:] for b in bands] == [(0, 13)] + [(14 * j - 1, 14 * j + 13) for j in range(1, 7)] + [(97, 112)]
    assert [b[1] for b in bands] == [28 * j + 28 for j in range(7)] + [224]
    plan = schedule(RowGraph.linear([CONV3, CONV3, POOL2], 224), 8, "2ps")
    for t in range(4):
        new = [plan.new[j][t] for j in range(8) if plan.new[j][t] is not None]
        # New rows of every tensor partition it: nothing is computed twice.
        assert new[0][0] == 0 and all(a[1] == b[0] for a, b in zip(new, new[1:], strict=False))
    # A conv band takes over k - 1 = 2 rows of its input from the band before.
    assert plan.carried(1, 1) == (25, 27)  # band 0 ends at conv-1 row 27 (26 + halo); band 1 reads from 25


def test_pool_and_stride_windows_never_straddle_bands() -> None:
    ops = [CONV3, RowOp(kernel=3, stride=2, pad_top=1, pad_bottom=1), CONV3, RowOp(kernel=3, stride=2, pad_top=1)]
    geometry = RowGraph.linear(ops, 97)
    for strategy in ("overl", "2ps"):
        plan = schedule(geometry, 6, strategy)
        for j in range(6):
            for node in geometry.nodes:
                rows = plan.new[j][node.output]
                if rows is None:
                    continue
                want = node.op.input_rows(*rows)
                held = plan.held[j][node.inputs[0]]
                # Whole windows: everything the band's output rows read (inside the image) is in the band.
                assert held[0] <= max(want[0], 0) and min(want[1], geometry.heights[node.inputs[0]]) <= held[1]
        if strategy == "2ps":
            # Band borders in a stride-2 conv's input sit on its window grid: output rows [0, b)
            # of a k=3, s=2, pad 1 conv end at input row 2b, so every border is even.
            for t in (1, 3):
                ends = [plan.new[j][t][1] for j in range(6) if plan.new[j][t] is not None]
                assert all(end % 2 == 0 or end == geometry.heights[t] for end in ends), (t, ends)


def test_band_plan_rejects_more_bands_than_rows() -> None:
    with pytest.raises(ValueError, match="more than the 7 output rows"):
        band_plan([CONV3, POOL2], 14, 8)
    with pytest.raises(ValueError, match="integer >= 1"):
        band_plan([CONV3, POOL2], 14, 0)


def _conv1d(x: np.ndarray, op: RowOp, taps: np.ndarray, top: int, bottom: int) -> np.ndarray:
    padded = np.concatenate([np.zeros(top), x, np.zeros(bottom)])
    count = (len(padded) - op.extent) // op.stride + 1
    return np.array(
        [sum(taps[t] * padded[r * op.stride + t * op.dilation] for t in range(op.kernel)) for r in range(count)]
    )


def _run_banded_1d(geometry: RowGraph, x: np.ndarray, weights: list[np.ndarray], bands: int, strategy: str):
    """Execute a schedule the way the pass emits it: slice held rows, pad at the image border, concat."""
    plan = schedule(geometry, bands, strategy)
    pieces, previous = [], {}
    for j in range(bands):
        entry = plan.held[j][0]
        held = {0: (x[slice(*entry)], entry)} if entry is not None else {}
        for node, taps in zip(geometry.nodes, weights, strict=True):
            t, src = node.output, node.inputs[0]
            rows = plan.new[j][t]
            parts = []
            if plan.carried(j, t) is not None:
                parts.append(previous[t])
            if rows is not None:
                want = node.op.input_rows(*rows)
                have = (max(want[0], 0), min(want[1], geometry.heights[src]))
                values, (lo, _) = held[src]
                band = values[have[0] - lo : have[1] - lo]
                out = _conv1d(band, node.op, taps, have[0] - want[0], want[1] - have[1])
                assert len(out) == rows[1] - rows[0]
                parts.append(out)
            if t == geometry.exit:
                pieces.append(parts[-1])
            elif plan.held[j][t] is not None:
                held[t] = (np.concatenate(parts), plan.held[j][t])
        previous = {}
        for t, (values, (lo, _)) in held.items():
            carried = plan.carried(j + 1, t) if j + 1 < bands else None
            if t and carried is not None:
                previous[t] = values[carried[0] - lo : carried[1] - lo]
    return np.concatenate(pieces)


def _row_ops(kernel: int, stride: int, dilation: int, pad: int, *, beyond_reach: bool) -> st.SearchStrategy[RowOp]:
    """RowOps up to the given sizes. Pads stop at the kernel's reach unless `beyond_reach`: then whole
    output rows can read only padding."""

    def build(k: int, s: int, d: int, top: int, bottom: int) -> RowOp:
        if not beyond_reach:
            top, bottom = min(top, d * (k - 1)), min(bottom, d * (k - 1))
        return RowOp(k, s, d, top, bottom)

    return st.builds(
        build,
        st.integers(1, kernel),
        st.integers(1, stride),
        st.integers(1, dilation),
        st.integers(0, pad),
        st.integers(0, pad),
    )


@dataclass(frozen=True)
class _Chain:
    geometry: RowGraph
    weights: list[np.ndarray]  # each op's taps
    x: np.ndarray
    expected: np.ndarray  # the chain's full, unbanded execution on x
    bands: int


@st.composite
def _chains(draw, ops: st.SearchStrategy[RowOp], max_ops: int, heights: st.SearchStrategy[int]) -> _Chain:
    """A linear chain of `ops` on a random input, its full 1-D execution and a band count."""
    chain_ops = draw(st.lists(ops, min_size=1, max_size=max_ops))
    height = draw(heights)
    try:
        geometry = RowGraph.linear(chain_ops, height)
    except ValueError:
        reject()  # the chain reads more rows than the input has
    assume(geometry.out_height >= 1)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(op.kernel) for op in chain_ops]
    x = rng.standard_normal(height)
    expected = x
    for op, taps in zip(chain_ops, weights, strict=True):
        expected = _conv1d(expected, op, taps, op.pad_top, op.pad_bottom)
    return _Chain(geometry, weights, x, expected, draw(st.integers(1, min(geometry.out_height, 9))))


@settings(max_examples=150, deadline=None)
@given(chain=_chains(_row_ops(5, 3, 3, 4, beyond_reach=False), max_ops=5, heights=st.integers(8, 120)))
def test_banded_execution_equals_full_execution_1d(chain: _Chain) -> None:
    for strategy in ("overl", "2ps"):
        got = _run_banded_1d(chain.geometry, chain.x, chain.weights, chain.bands, strategy)
        np.testing.assert_allclose(got, chain.expected, rtol=1e-10, atol=1e-10)


def test_a_band_of_one_padding_row_reads_nothing() -> None:
    # The property test's counterexample: 24 rows, a dilated 3x3 conv (20 rows), then a 1x1 stride-2
    # conv with pad 1 (11 rows, row 0 reads row -1). 2PS gives band 0 of 6 that one exit row.
    geometry = RowGraph.linear([RowOp(3, 1, 2), RowOp(1, 2, 1, 1, 1), RowOp()], 24)
    plan = schedule(geometry, 6, "2ps")
    assert plan.new[0][2] == (0, 1)
    assert padding_only_reads(plan) == [(0, 1)]
    assert padding_only_reads(schedule(geometry, 2, "2ps")) == []
    assert padding_only_reads(schedule(geometry, 11, "overl")) == [(0, 1)]  # one exit row per band
    assert padding_only_reads(schedule(geometry, 5, "overl")) == []


@settings(max_examples=150, deadline=None)
@given(chain=_chains(_row_ops(3, 2, 2, 3, beyond_reach=True), max_ops=4, heights=st.integers(4, 40)))
def test_padding_only_reads_are_exactly_the_bands_that_read_no_rows(chain: _Chain) -> None:
    geometry, bands = chain.geometry, chain.bands
    for strategy in ("overl", "2ps"):
        plan = schedule(geometry, bands, strategy)
        # Brute force: a band's rows of a node have no input rows to slice when every padded row from
        # their first row's first tap to their last row's last tap is padding.
        empty = []
        for j in range(bands):
            for index, node in enumerate(geometry.nodes):
                rows, op = plan.new[j][node.output], node.op
                if rows is None:
                    continue
                taps = [
                    r * op.stride - op.pad_top + tap * op.dilation for r in range(*rows) for tap in range(op.kernel)
                ]
                if not any(0 <= i < geometry.heights[node.inputs[0]] for i in range(min(taps), max(taps) + 1)):
                    empty.append((j, index))
        assert padding_only_reads(plan) == empty
        if not empty:  # every band reads rows: the banded execution is exact
            got = _run_banded_1d(geometry, chain.x, chain.weights, bands, strategy)
            np.testing.assert_allclose(got, chain.expected, rtol=1e-10, atol=1e-10)


def test_residual_geometry_two_strategies() -> None:
    # x -> conv3 -> conv3 -> add(x) -> pool2: the identity path needs no halo, the conv path does.
    heights = (33, 33, 33, 33, 16)
    nodes = (
        RowNode(CONV3, (0,), 1),
        RowNode(CONV3, (1,), 2),
        RowNode(RowOp(), (2, 0), 3),
        RowNode(POOL2, (3,), 4),
    )
    geometry = RowGraph(heights, nodes, 4)
    overl = schedule(geometry, 4, "overl")
    assert overl.held[1][0] == (8 - 2, 16 + 2) and overl.held[1][3] == (8, 16)
    tps = schedule(geometry, 4, "2ps")
    # Entry-balanced: band 0 writes pooled rows [0, 3) and so computes input rows [0, 8); band 1
    # computes conv-1 rows [7, 15), reading the input from row 6 (2 rows taken over from band 0).
    assert [tps.new[j][4] for j in range(4)] == [(0, 3), (3, 7), (7, 11), (11, 16)]
    assert tps.held[1][0] == (6, 16) and tps.new[1][0] == (8, 16) and tps.new[1][1] == (7, 15)


def test_recompute_overhead_counts_halo_rows() -> None:
    geometry = RowGraph.linear([CONV3, CONV3, POOL2], 64)
    assert recompute_overhead(schedule(geometry, 4, "2ps"), [1.0, 1.0, 1.0]) == 0.0
    overhead = recompute_overhead(schedule(geometry, 4, "overl"), [1.0, 1.0, 1.0])
    # Conv 1 recomputes conv 2's 1-row halo on both sides of the 3 inner borders: 6 rows.
    assert overhead == pytest.approx(6 / (64 + 64 + 32))
