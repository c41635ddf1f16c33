"""The new lowerings in whole models: the portable step (run here, on this venv's onnxruntime, with
standard ops only) against the training build, 2 steps, loss and every parameter within 1e-5.

- GatherGrad: a CNN whose trained part upsamples with nearest Resize, which legalize_resize turns
  into Gathers with repeated constant indices (every source row is read twice);
- SliceGrad: every conv of a zoo model trained and row-tiled, where row_recompute assembles the
  tiled chain's entry gradient with one SliceGrad (`portable_matrix`: its compile takes minutes);
- the torchvision families of the coverage matrix, last 4 convs trained, one step, within 1e-5 of
  the loss's and each tensor's magnitude (`portable_matrix`, deselected by default:
  `pytest -m portable_matrix tests/test_lower_end_to_end.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from tests.test_portable import OPTIMIZERS, assert_backends_agree, compile_zoo, reference_batches
from tests.zoo_helpers import torch

STEPS = 2


def _training_ops(artifacts: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(artifacts / "training_model.onnx")).graph.node}


class _NearestUpsampleNet(torch.nn.Module):
    """conv -> 2x nearest upsample -> conv -> conv -> pooled classifier: all three convs train."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.mix = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.head = torch.nn.Conv2d(6, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.nn.functional.interpolate(x, size=(12, 12), mode="nearest")
        x = torch.relu(self.mix(x))
        x = self.head(x).mean(dim=(2, 3))
        return self.fc(x)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_nearest_upsample_gather_grad(tmp_path, optimizer: str) -> None:
    from models.export import export_onnx

    torch.manual_seed(0)
    path = export_onnx(_NearestUpsampleNet().eval(), tmp_path / "upsample.onnx", input_shape=(1, 3, 12, 12))
    config = CompileConfig(
        filter_layers=0, train_layers=3, batch_size=2, output_dir=tmp_path / "artifacts", **OPTIMIZERS[optimizer]
    )
    artifacts = compile_model(path, config, report=lambda message: None)
    assert "GatherGrad" in _training_ops(artifacts)
    rng = np.random.default_rng(3)
    batches = [
        (rng.standard_normal((2, 3, 12, 12)).astype(np.float32), rng.integers(0, 5, size=2).astype(np.int64))
        for _ in range(STEPS)
    ]
    assert_backends_agree(artifacts, batches)


@pytest.mark.slow
@pytest.mark.portable_matrix
def test_row_tiled_trainable_entry_slice_grad(tmp_path) -> None:
    from tests.zoo_helpers import ZOO_CASES, export_case

    _, source = export_case(ZOO_CASES["mcunet"], tmp_path)
    every_conv = sum(node.op_type == "Conv" for node in onnx.load(str(source)).graph.node)
    options = {"filter_layers": 0, "train_layers": every_conv, "row_tiles": 2, "row_tile_trainable": True}
    case, artifacts = compile_zoo(tmp_path, "mcunet", ZOO_CASES["mcunet"].input_shape, {**options, **OPTIMIZERS["sgd"]})
    assert "SliceGrad" in _training_ops(artifacts)
    assert_backends_agree(artifacts, reference_batches(case, 10, steps=STEPS))


TORCHVISION = [
    "mobilenet_v3_small",
    "squeezenet1_1",
    "densenet_tiny",
    "lraspp_mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "googlenet",
    "mnasnet0_5",
    "regnet_y_400mf",
    "convnext_tiny",
    "resnet50",
    "inception_v3",
]


@pytest.mark.slow
@pytest.mark.portable_matrix
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_family_portable_step(tmp_path, name: str) -> None:
    from tests import test_torchvision_coverage as coverage

    arch = next(a for a in [*coverage.FAST, *coverage.SLOW] if a.name == name)
    _, path = coverage.Workbench(tmp_path).model(arch)
    config = CompileConfig(
        filter_layers=0, train_layers=4, batch_size=2, output_dir=tmp_path / "artifacts", **OPTIMIZERS["sgd"]
    )
    artifacts = compile_model(path, config, report=lambda message: None)
    rng = np.random.default_rng(1)
    label_shape = (2, arch.size, arch.size) if arch.segmentation else (2,)
    batches = [
        (
            rng.standard_normal((2, 3, arch.size, arch.size)).astype(np.float32),
            rng.integers(0, arch.classes, size=label_shape).astype(np.int64),
        )
        # One step: random weights with random BN statistics give first losses up to 1e9 (Inception
        # v3), whose update makes the second step's gradient overflow on either backend. One step
        # runs every lowered op of the family; the optimizer across steps is the zoo cases' job.
        for _ in range(1)
    ]
    assert_backends_agree(artifacts, batches, scaled=True)
