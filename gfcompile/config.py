"""What the user asked for. Built by the CLI (or by code), read by the pipeline only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

LossName = Literal["auto", "cross_entropy", "pixel_cross_entropy", "mse"]
OptimizerName = Literal["adamw", "sgd"]


@dataclass
class CompileConfig:
    filter_layers: int = 0
    train_layers: int | None = None  # None: same as filter_layers, or DEFAULT_TRAIN_LAYERS when that is 0
    patch_size: int = 2
    patch_size_map: dict[str, int] = field(default_factory=dict)
    paper_stride_scaling: bool = False
    batch_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    bn_mode: Literal["eval", "train", "frozen"] = "eval"
    loss: LossName = "auto"
    ignore_index: int = 255
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    row_tiles: int = 0
    row_strategy: Literal["overl", "2ps"] = "overl"
    memory_budget_mb: float | None = None
    row_tile_trainable: bool = False
    output_dir: Path = Path("artifacts")
    force: bool = False

    def resolved_train_layers(self) -> int:
        if self.train_layers is not None:
            return self.train_layers
        return self.filter_layers if self.filter_layers > 0 else DEFAULT_TRAIN_LAYERS

    def to_json(self) -> dict:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["train_layers"] = self.resolved_train_layers()
        return data


DEFAULT_TRAIN_LAYERS = 4
DEFAULT_BATCH_SIZE = 32
