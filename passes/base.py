"""The pass contract shared by every graph rewrite in `passes/`.

A pass is a module with:

    STAGE: Stage                  # "forward" (before the backward is built) or "training"
    REQUIRES: tuple[str, ...]     # facts about the graph the pass relies on (see FACTS)
    def run(graph: gs.Graph, plan: Plan) -> gs.Graph

A pass never reads CLI flags, never writes files and never imports another pass.
The pipeline converts ModelProto <-> gs.Graph once per pass at the runner boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Stage = Literal["forward", "training"]

# Facts a pass may declare in REQUIRES. The runner checks the ones it can check.
FACTS = {
    "static_shapes": "every graph input has static dims (pinned by pin_shapes)",
    "bn_eval_affine": "BatchNorm of trainable layers is already an eval-mode affine (Mul/Add)",
    "ort_gradient_graph": "the graph is a training graph produced by ORT's gradient builder",
}


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
    trainable_params: list[str] = field(default_factory=list)
    frozen_params: list[str] = field(default_factory=list)
    bn_mode: Literal["eval", "train", "frozen"] = "eval"
    paper_stride_scaling: bool = False
    row_tiles: int = 0
    row_strategy: Literal["overl", "2ps"] = "overl"
    row_tile_trainable: bool = False

    def conv(self, node_name: str) -> ConvLayer:
        for layer in self.convs:
            if layer.node == node_name:
                return layer
        raise KeyError(f"no conv node named {node_name!r} in the plan")

    def to_json(self) -> dict:
        return asdict(self)
