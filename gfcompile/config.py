"""What the user asked for. Built by the CLI (or by code), read by the pipeline only."""

from __future__ import annotations

import math
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
    downconvert: bool = False  # lower an IR version / opset newer than ORT 1.19 takes, where that is exact
    feature_cache: bool = False  # also write the frozen prefix and the tail's models (gfcompile/prefix_split.py)
    portable: bool = True  # also write the portable train step (standard ONNX ops); off: onnxruntime-training only

    def resolved_train_layers(self) -> int:
        if self.train_layers is not None:
            return self.train_layers
        return self.filter_layers if self.filter_layers > 0 else DEFAULT_TRAIN_LAYERS

    def to_json(self) -> dict:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["train_layers"] = self.resolved_train_layers()
        if not self.downconvert:
            del data["downconvert"]  # recorded only when used, so ordinary manifests stay as they were
        if not self.feature_cache:
            del data["feature_cache"]
        if self.portable:
            del data["portable"]  # recorded only when turned off, as the two above
        return data

    def check(self) -> None:
        """Refuse option values that no model can make sense of, before any work is done."""
        from .errors import GfError

        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GfError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise GfError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise GfError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.memory_budget_mb is not None and not (
            math.isfinite(self.memory_budget_mb) and self.memory_budget_mb > 0
        ):
            raise GfError(f"--memory-budget must be a positive number of MiB, got {self.memory_budget_mb}")
        if self.batch_size is not None and self.batch_size < 1:
            raise GfError(f"--batch-size must be >= 1, got {self.batch_size}")


DEFAULT_TRAIN_LAYERS = 4
DEFAULT_BATCH_SIZE = 32
