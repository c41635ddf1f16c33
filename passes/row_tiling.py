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
A conv padding beyond its kernel's reach (pad > dilation * (kernel - 1), e.g. a 1x1 conv with
pad 1) has output rows that read only padding; a chain whose K bands include a band made only
of such rows of some op is not tiled in K bands (logged; `padding_only_refusal`), since that
band has no input rows to run the op on. Such rows are constant (the conv's bias), but
emitting them as constants would need their own band op and gradient path for little gain.
AveragePool with ceil_mode ends a chain too (its divisor at the bottom border depends on
ceil mode, not only on the pads); MaxPool with ceil_mode is tiled (it ignores padding, so
the pass pads the last window instead).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .names import NameAllocator

# The pass's building blocks, one module per seam; their public API is re-exported here for
# the tools that know row tiling by this name (pipeline, benchmarks, tests).
from .row_chains import (
    MAX_EXIT_RATIO,
    MAX_OVERL_RECOMPUTE,
    Chain,
    candidate_chains,
    chain_peak_bytes,
    describe_regions,
    find_regions,
    max_row_tiles,
    select_chains,
    tiles_trainable,
)
from .row_emission import TiledChain, tile_chain
from .row_geometry import (
    STRATEGIES,
    BandSchedule,
    RowGraph,
    RowNode,
    RowOp,
    Strategy,
    band_plan,
    output_splits,
    recompute_overhead,
    schedule,
)
from .row_memory import (
    MIB,
    estimate_peak_bytes,
    ort_default_order,
    peak_by_tiles,
    required_session_options,
    smallest_feasible_tiles,
    tiles_for_budget,
)

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ("bn_eval_affine",)
FACTS: tuple[str, ...] = ("static_shapes",)

_LOG = pass_logger(__name__)


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
    if _LOG.isEnabledFor(logging.DEBUG):
        for line in describe_regions(graph, plan):
            _LOG.debug("region: %s", line)
    if not chains:
        # The pipeline tells the user too; `plan.tiled_chains` stays 0, so the artifacts get
        # ORT's default session options and the manifest records no row tiles.
        _LOG.info("no conv chain that ends at a pool or stride outside the trained layers can be tiled; nothing tiled")
        return graph
    names = NameAllocator(graph)
    for chain in chains:
        plan.generated.chain_scopes[chain.name] = tile_chain(graph, chain, chain.bands, chain.strategy, names).scope
        _LOG.info(
            "%s %s -> %s in %d bands (%d ops)",
            chain.strategy,
            chain.entry.name,
            chain.exit.name,
            chain.bands,
            len(chain.ops),
        )
    graph.cleanup()
    return graph


__all__ = [
    "FACTS",
    "MAX_EXIT_RATIO",
    "MAX_OVERL_RECOMPUTE",
    "MIB",
    "REQUIRES",
    "STAGE",
    "STRATEGIES",
    "BandSchedule",
    "Chain",
    "RowGraph",
    "RowNode",
    "RowOp",
    "Strategy",
    "TiledChain",
    "band_plan",
    "candidate_chains",
    "chain_peak_bytes",
    "estimate_peak_bytes",
    "find_regions",
    "max_row_tiles",
    "ort_default_order",
    "output_splits",
    "peak_by_tiles",
    "recompute_overhead",
    "required_session_options",
    "run",
    "schedule",
    "select_chains",
    "smallest_feasible_tiles",
    "tile_chain",
    "tiles_for_budget",
    "tiles_trainable",
]
