"""Graph rewrite passes and what they share.

A module with `run(graph, plan)` is one pass (see `passes.base` for the contract). The others
are shared building blocks that rewrite nothing on their own: `names` (generated names and how
later passes find them), `emitter` (adding nodes), `geometry` (conv pads, gradient-filter
geometry and costs), `graph_utils`, and row tiling's `row_geometry`, `row_chains`,
`row_emission` and `row_memory`.
"""
