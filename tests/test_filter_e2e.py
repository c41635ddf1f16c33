"""Gradient filtering end to end: one filtered step of every zoo model equals the torch reference, and loss falls."""

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
from tests.reference.gradient_filter_torch import replace_convs
from tests.zoo_helpers import ZOO_CASES, export_case, make_batch, relative_error, torch, torch_reference

# DeepLab's ASPP image-pooling conv sees a 1x1 map, so it keeps r = 1 (exact for a 1x1 map).
ASPP_POOL_CONV = "classifier.0.convs.4.1.weight"
BATCH = 2
GRAD_TOL = 1e-4  # float32 ORT vs float32 torch; the stride bug alone gives errors near 3


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


def conv_output_maps(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    """(H_y, W_y) of every nn.Conv2d, measured by running torch (independent of the planner)."""
    maps: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            maps[name] = tuple(output.shape[-2:])

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return maps


def expected_patch_size(requested: int, explicit: bool, output_map: tuple[int, int]) -> int:
    """The r a filtered conv must get: the requested one.

    The one documented exception (README, planning): a global --patch-size larger than a layer's
    output map shrinks to the largest r that fits, max(H_y, W_y); r = 1 is an exact backward, so
    such a layer leaves the filtered set. An r given in --patch-size-map is taken as asked.
    """
    return requested if explicit else min(requested, max(output_map))


def check_filtered_step_against_torch(tmp_path: Path, name: str, n: int, r: int, size: int = 224) -> None:
    """One compiled filtered step equals the torch reference with the same last n convs replaced."""
    case = _case(name, size)
    model, onnx_path = export_case(case, tmp_path)
    patch_size_map = {ASPP_POOL_CONV: 1} if case.segmentation and n >= 4 else {}
    artifacts = _compile(onnx_path, tmp_path / "artifacts", n, r, batch=BATCH, segmentation=case.segmentation)
    trainer = Trainer(artifacts)
    plan = trainer.manifest["plan"]
    assert "gradient_filter" in trainer.manifest["passes"]["training"]

    # The compiler filters the reference's last n nn.Conv2d modules, each with the r it was asked for.
    training = onnx.load(str(artifacts / "training_model.onnx"), load_external_data=False)
    weight_of = {node.name: node.input[1] for node in training.graph.node if node.op_type == "Conv"}
    compiled = {weight_of[node].removesuffix(".weight"): patch for node, patch in plan["filtered"].items()}
    torch_convs = [module for module, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    output_maps = conv_output_maps(model, case.input_shape)
    expected = {}
    for module in torch_convs[len(torch_convs) - n :]:
        explicit = f"{module}.weight" in patch_size_map
        patch = expected_patch_size(patch_size_map.get(f"{module}.weight", r), explicit, output_maps[module])
        if patch > 1 or explicit:
            expected[module] = patch
    assert compiled == expected, "the planner chose other layers or another r than asked"
    replace_convs(model, expected)

    classes = trainer.manifest["outputs"][0]["shape"][1]
    x, y = make_batch(case, BATCH, classes)
    ref_loss, ref_grads = torch_reference(model, plan["trainable_params"], x, y)
    trainer.module.train()
    loss = float(trainer.module(x, y)[0])
    assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert set(ref_grads) == set(plan["trainable_params"])
    for param, reference in ref_grads.items():
        actual = trainer.state.parameters[param].grad
        assert actual.shape == reference.shape, param
        assert relative_error(actual, reference) <= GRAD_TOL, (param, relative_error(actual, reference))


# Strided 1x1 downsample (stride correction), r != the default 2 (planner honours --patch-size),
# depthwise and pointwise convs, and DeepLab's dilated ASPP with its 1x1 pooling branch.
FAST_CASES = [
    ("resnet18", 4, 2),
    ("resnet18", 2, 7),
    ("mobilenet_v2", 1, 4),
    ("mcunet", 2, 4),
    ("deeplabv3_resnet18", 4, 2),
]
FULL_MATRIX = [
    (name, n, r) for name in ZOO_CASES for n in (1, 2, 4) for r in (2, 4, 7) if (name, n, r) not in FAST_CASES
]


@pytest.mark.parametrize(("name", "n", "r"), FAST_CASES)
def test_filtered_step_matches_torch_reference(tmp_path: Path, name: str, n: int, r: int) -> None:
    check_filtered_step_against_torch(tmp_path, name, n, r)


@pytest.mark.slow
@pytest.mark.zoo_matrix
@pytest.mark.parametrize(("name", "n", "r"), FULL_MATRIX)
def test_filtered_step_matches_torch_reference_full_matrix(tmp_path: Path, name: str, n: int, r: int) -> None:
    check_filtered_step_against_torch(tmp_path, name, n, r)


def test_filtered_backward_reads_only_pooled_inputs(tmp_path: Path) -> None:
    """The memory claim: no ConvGrad reads a filtered conv's full-resolution input any more."""
    case = _case("resnet18", 224)
    _, onnx_path = export_case(case, tmp_path)
    artifacts = _compile(onnx_path, tmp_path / "artifacts", 4, 4, batch=BATCH, segmentation=False)
    training = onnx.load(str(artifacts / "training_model.onnx"))
    filtered = Trainer(artifacts).manifest["plan"]["filtered"]
    inferred = onnx.shape_inference.infer_shapes(training)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    conv_grad_inputs = {node.input[1] for node in training.graph.node if node.op_type == "ConvGrad"}
    for conv_name, patch in filtered.items():
        conv = next(node for node in training.graph.node if node.name == conv_name)
        assert conv.input[0] not in conv_grad_inputs
        pooled = pooled_input_name(conv_name)
        assert any(pooled in node.input for node in training.graph.node), conv_name
        _, c_in, _, _ = shapes[conv.input[0]]
        _, _, h_y, w_y = shapes[conv.output[0]]
        assert shapes[pooled] == [BATCH, c_in, -(-h_y // patch), -(-w_y // patch)], conv_name


@pytest.mark.parametrize("name", list(ZOO_CASES))
def test_smoke_filtered_training_lowers_loss_on_real_data(tmp_path: Path, name: str) -> None:
    # A smoke test (a 4x gradient still lowers the loss); test_filtered_step_matches_torch_reference pins the numbers.
    case = _case(name, 64)
    _, onnx_path = export_case(case, tmp_path)
    artifacts = _compile(onnx_path, tmp_path / "artifacts", 4, 2, batch=16, segmentation=case.segmentation, lr=3e-3)
    trainer = Trainer(artifacts)
    data = digits_dataset(64, case.segmentation)
    before = trainer.evaluate(data).loss
    trainer.fit(data, steps=20, log_every=0)
    after = trainer.evaluate(data).loss
    assert after < 0.8 * before, (before, after)
