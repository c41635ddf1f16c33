"""The pass contract shared by every graph rewrite in `passes/`.

A pass is a module with one entry point and three declarations:

    STAGE: Stage                  # when it runs: "legalize", "forward", "training" or "lower"
    REQUIRES: tuple[str, ...]     # passes (module names) that must have run before it, in this compile
    FACTS: tuple[str, ...]        # optional: facts about the input graph it relies on (see GRAPH_FACTS)
    def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph

Stages, in pipeline order: "legalize" rewrites the loaded model into the subset the compiler
supports, before shapes are pinned and before there is a Plan (`plan` is None); "forward"
rewrites the pinned forward graph; "training" rewrites ORT's training graph; "lower" runs
last, on the training graph.

A pass never reads CLI flags, never writes files and never imports another pass. Names it
generates come from `passes.names.NameAllocator` (new in the graph by construction), nodes
from `passes.emitter.Emitter`; what a later pass must find is published in `Plan.generated`.
Refusals are `ValueError` (the runner turns them into one-line user errors naming the pass);
anything else escaping a pass is reported as an internal error of that pass. Passes log to
`pass_logger(__name__)` ("gfcompile.passes.<name>", shown by `gfcompile -v`), including why
a candidate was skipped. The runner (gfcompile/passrunner.py) converts ModelProto <-> gs.Graph
once per pass, checks REQUIRES and FACTS before it and, after it, that every tensor name has
exactly one producer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

from .names import GeneratedNames

Stage = Literal["legalize", "forward", "training", "lower"]
STAGES: tuple[Stage, ...] = ("legalize", "forward", "training", "lower")

# Facts a pass may declare in FACTS. The runner checks each before the pass runs.
GRAPH_FACTS = {
    "static_shapes": "every graph input has static dims (pinned by pin_shapes)",
    "ort_gradient_graph": "the graph is a training graph produced by ORT's gradient builder",
}


def pass_logger(module_name: str) -> logging.Logger:
    """The logger of the pass `module_name` (its `__name__`): "gfcompile.passes.<pass>"."""
    return logging.getLogger(f"gfcompile.passes.{module_name.rsplit('.', 1)[-1]}")


@dataclass(frozen=True)
class ConvLayer:
    """Geometry and names of one forward Conv node, with static shapes.

    Shapes are NCHW with the pinned batch size. `pads` follow ONNX order
    (top, left, bottom, right). `bn` is the BatchNormalization node that directly
    consumes this conv's output, if any.
    """

    node: str
    index: int
    input: str
    output: str
    weight: str
    bias: str | None
    x_shape: tuple[int, int, int, int]
    y_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    group: int
    bn: str | None = None


@dataclass
class Plan:
    """What happens to each layer; the single source of truth for all passes.

    `filtered` maps a conv node name to its patch size r. Every filtered conv is
    also trainable. `paper_stride_scaling=True` reproduces the reference code of
    Yang et al. that omits the 1/(s_h*s_w) factor for strided layers.
    """

    convs: list[ConvLayer]
    trainable_convs: list[str] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)
    # Filtered convs whose output map was smaller than --patch-size: conv -> the r they got instead
    # (the largest that fits; 1 means an exact backward, and the conv is then not in `filtered`).
    fitted_patch_sizes: dict[str, int] = field(default_factory=dict)
    trainable_params: list[str] = field(default_factory=list)
    frozen_params: list[str] = field(default_factory=list)
    bn_mode: Literal["eval", "train", "frozen"] = "eval"
    paper_stride_scaling: bool = False
    row_tiles: int = 0
    row_strategy: Literal["overl", "2ps"] = "overl"
    row_tile_trainable: bool = False
    # Filled in while the passes run (one compile): which passes ran, what they generated.
    passes_run: list[str] = field(default_factory=list)
    generated: GeneratedNames = field(default_factory=GeneratedNames)

    @property
    def tiled_chains(self) -> int:
        """How many conv chains row_tiling actually tiled (0 when it found none, or did not run)."""
        return len(self.generated.chain_scopes)

    @property
    def applied_row_tiles(self) -> int:
        """`row_tiles` if row_tiling tiled at least one chain, else 0 (what the artifacts really do)."""
        return self.row_tiles if self.row_tiles >= 2 and self.tiled_chains else 0

    def conv(self, node_name: str) -> ConvLayer:
        for layer in self.convs:
            if layer.node == node_name:
                return layer
        raise KeyError(f"no conv node named {node_name!r} in the plan")

    def to_json(self) -> dict:
        return asdict(self)
