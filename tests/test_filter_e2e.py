"""Gradient filtering end to end: every zoo model compiles and trains, and loss falls on real data."""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from models.digits import load_digits_32, resize_bilinear
from passes.gradient_filter import pooled_input_name
from runtime.data import Dataset
from runtime.trainer import Trainer
from tests.zoo_helpers import ZOO_CASES, export_case

# DeepLab's ASPP image-pooling conv sees a 1x1 map, so it keeps r = 1 (exact for a 1x1 map).
ASPP_POOL_CONV = "classifier.0.convs.4.1.weight"


def _case(name: str, size: int):
    return dataclasses.replace(ZOO_CASES[name], input_shape=(3, size, size))


@cache
def digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real data: scikit-learn's digits 0-3, upscaled to size x size, normalised, as 3 channels."""
    x, y = load_digits_32(classes=[0, 1, 2, 3])
    images = resize_bilinear(x[:, 0].astype(np.float64) / 255.0, size)
    images = ((images - 0.3) / 0.3).astype(np.float32)
    return np.repeat(images[:, None], 3, axis=1), y


def digits_dataset(size: int, segmentation: bool) -> Dataset:
    x, y = digits_images(size)
    if segmentation:
        # Pixels of the stroke carry the digit's class (1..4), the rest is background (0).
        stroke = x[:, 0] > 0.5
        return Dataset(x=x, y=np.where(stroke, y[:, None, None] + 1, 0).astype(np.int64))
    return Dataset(x=x, y=y)


def _compile(onnx_path: Path, out: Path, n: int, r: int, batch: int, segmentation: bool, lr: float = 1e-3) -> Path:
    config = CompileConfig(
        filter_layers=n,
        patch_size=r,
        patch_size_map={ASPP_POOL_CONV: 1} if segmentation and n >= 4 else {},
        batch_size=batch,
        lr=lr,
        output_dir=out,
    )
    return compile_model(onnx_path, config, report=lambda message: None)


@pytest.mark.parametrize("r", [2, 4, 7])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", list(ZOO_CASES))
def test_zoo_model_compiles_filtered_and_trains(tmp_path: Path, name: str, n: int, r: int) -> None:
    case = _case(name, 224)
    _, onnx_path = export_case(case, tmp_path)
    artifacts = _compile(onnx_path, tmp_path / "artifacts", n, r, batch=2, segmentation=case.segmentation)
    training = onnx.load(str(artifacts / "training_model.onnx"))
    trainer = Trainer(artifacts)
    filtered = trainer.manifest["plan"]["filtered"]
    assert len(filtered) == n and "gradient_filter" in trainer.manifest["passes"]["training"]

    # The backward of every filtered conv reads the pooled input (N, C, ceil(H_y/r), ceil(W_y/r)),
    # and no ConvGrad reads the conv's full-resolution input any more.
    inferred = onnx.shape_inference.infer_shapes(training)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    conv_grad_inputs = {node.input[1] for node in training.graph.node if node.op_type == "ConvGrad"}
    for conv_name, patch in filtered.items():
        conv = next(node for node in training.graph.node if node.name == conv_name)
        assert conv.input[0] not in conv_grad_inputs
        pooled = pooled_input_name(conv_name)
        assert any(pooled in node.input for node in training.graph.node), conv_name
        _, c_in, _, _ = shapes.get(conv.input[0]) or [
            d.dim_value for d in training.graph.input[0].type.tensor_type.shape.dim
        ]
        _, _, h_y, w_y = shapes[conv.output[0]]
        assert shapes[pooled] == [2, c_in, -(-h_y // patch), -(-w_y // patch)], conv_name

    data = digits_dataset(224, case.segmentation)
    losses = [trainer.train_step(data.x[i : i + 2], data.y[i : i + 2]) for i in (0, 2)]
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("name", list(ZOO_CASES))
def test_filtered_training_lowers_loss_on_real_data(tmp_path: Path, name: str) -> None:
    case = _case(name, 64)
    _, onnx_path = export_case(case, tmp_path)
    artifacts = _compile(onnx_path, tmp_path / "artifacts", 4, 2, batch=16, segmentation=case.segmentation, lr=3e-3)
    trainer = Trainer(artifacts)
    data = digits_dataset(64, case.segmentation)
    before = trainer.evaluate(data).loss
    trainer.fit(data, steps=20, log_every=0)
    after = trainer.evaluate(data).loss
    assert after < 0.8 * before, (before, after)
