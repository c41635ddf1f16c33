"""Upsample/pool fusion between stacked filtered convs: same gradients, fewer full-resolution tensors.

Every case compiles a model up to the training graph, then runs `gradient_filter` alone
and `gradient_filter` + `gradient_filter_fusion`, and compares the trainable parameters'
gradients from ORT's training API on one batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from gfcompile.backward import build_backward
from gfcompile.config import CompileConfig
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.passrunner import run_passes
from gfcompile.pipeline import FORWARD_PASSES
from gfcompile.planning import select_layers
from passes import geometry, gradient_filter, gradient_filter_fusion
from passes.base import Plan
from passes.names import G_POOL, UPSAMPLE, in_role, preferred_filter_scope, scoped
from runtime.ort_training import training_api
from tests.zoo_helpers import ZOO_CASES, export_case, make_batch, randomize_batchnorm, relative_error, torch

TOL = 1e-6
# MobileNetV2's last two convs: the linear-bottleneck projection, its BN, then the 1x1 head conv.
MNV2_LOWER = "/features/features.17/conv/conv.2/Conv"
MNV2_UPPER = "/features/features.18/features.18.0/Conv"
MNV2_BN_SHIFT = "/features/features.17/conv/conv.3/BatchNormalization/add_Grad"  # ORT's dbeta ReduceSum


@dataclass
class Compiled:
    plan: Plan
    directory: Path
    filtered: onnx.ModelProto
    fused: onnx.ModelProto
    batch: tuple[np.ndarray, np.ndarray]


def _compile(onnx_path: Path, tmp_path: Path, config: CompileConfig, batch) -> Compiled:
    model = pin_shapes(load_and_validate(onnx_path), config)
    plan = select_layers(model, config)
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    train = build_backward(forward, plan, config, tmp_path / "artifacts")
    filtered = run_passes((gradient_filter,), train.training, plan, stage="training")
    fused = run_passes((gradient_filter, gradient_filter_fusion), train.training, plan, stage="training")
    return Compiled(plan, train.directory, filtered, fused, batch)


def _compile_mobilenet(tmp_path: Path, bn_mode: str, size: int, patch_size_map: dict | None = None) -> Compiled:
    case = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, size, size))
    _, onnx_path = export_case(case, tmp_path)
    config = CompileConfig(filter_layers=2, batch_size=2, bn_mode=bn_mode, patch_size_map=patch_size_map or {})
    return _compile(onnx_path, tmp_path, config, make_batch(case, 2, 10))


def _gradients(compiled: Compiled, training: onnx.ModelProto, name: str) -> dict[str, np.ndarray]:
    path = compiled.directory / name
    onnx.save(training, str(path))
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(compiled.directory / "checkpoint"))
    module = api.Module(str(path), state, str(compiled.directory / "eval_model.onnx"))
    module.train()
    module(*compiled.batch)
    return {name: state.parameters[name].grad.copy() for name in compiled.plan.trainable_params}


def _assert_same_gradients(compiled: Compiled) -> None:
    expected = _gradients(compiled, compiled.filtered, "filtered_training.onnx")
    actual = _gradients(compiled, compiled.fused, "fused_training.onnx")
    for name in compiled.plan.trainable_params:
        assert np.abs(expected[name]).max() > 0, name  # a zero gradient would compare equal to anything
        assert relative_error(actual[name], expected[name]) <= TOL, name


def _full_resolution_outputs(model: onnx.ModelProto, shape: tuple[int, ...]) -> list[str]:
    """Names of node outputs with exactly `shape` (y_A == x_B here): the tensors the fusion is about."""
    graph = gs.import_onnx(model)
    return [t.name for n in graph.nodes for t in n.outputs if t.shape is not None and tuple(t.shape) == shape]


def _ops_named(model: onnx.ModelProto, prefix: str) -> list[str]:
    return [node.op_type for node in model.graph.node if node.name.startswith(prefix)]


# These models name nothing like the filter's tensors, so each conv's filter scope is the preferred one.
def _pool_nodes(model: onnx.ModelProto, conv: str) -> list[str]:
    return _ops_named(model, scoped(preferred_filter_scope(conv), G_POOL))


def _upsample_nodes(model: onnx.ModelProto, conv: str) -> list[str]:
    return [n.op_type for n in model.graph.node if in_role(preferred_filter_scope(conv), UPSAMPLE, n.name)]


def _signature(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node]


# 64x64: the last maps are 2x2, r=2 windows are whole (block-sum pool, aligned).
# 96x96: 3x3 maps, the windows hang over the border (means of the in-image elements).
@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("bn_mode", ["eval", "frozen"])
def test_mobilenet_pair_is_fused_exactly(tmp_path: Path, bn_mode: str, size: int) -> None:
    compiled = _compile_mobilenet(tmp_path, bn_mode, size)
    onnx.checker.check_model(compiled.fused, full_check=True)
    fusions = gradient_filter_fusion.find_fusions(gs.import_onnx(compiled.filtered), compiled.plan)
    assert [(f.lower, f.upper) for f in fusions] == [(MNV2_LOWER, MNV2_UPPER)]
    assert fusions[0].pooled_holds_sums == (size == 64)

    lower = compiled.plan.conv(MNV2_LOWER)
    assert _pool_nodes(compiled.filtered, MNV2_LOWER) and not _pool_nodes(compiled.fused, MNV2_LOWER)
    fused_tensors = set(_full_resolution_outputs(compiled.fused, lower.y_shape))
    assert f"{lower.output}_grad" not in fused_tensors  # g_y_A is never materialised
    assert len(fused_tensors) < len(_full_resolution_outputs(compiled.filtered, lower.y_shape))
    if bn_mode == "frozen":
        # Nothing else reads grad_x_B: B's upsample is gone as well.
        assert _upsample_nodes(compiled.filtered, MNV2_UPPER) and not _upsample_nodes(compiled.fused, MNV2_UPPER)
    else:
        # dgamma = sum(g * x^) keeps it; dbeta reads the patch-resolution gradient instead.
        assert _upsample_nodes(compiled.fused, MNV2_UPPER)
        shift_grads = [n for n in compiled.fused.graph.node if n.op_type == "ReduceSum" and MNV2_BN_SHIFT in n.name]
        assert shift_grads and all(n.input[0].startswith(f"{MNV2_LOWER}/gf/fuse/") for n in shift_grads)
    _assert_same_gradients(compiled)


@pytest.mark.parametrize(
    ("size", "patch_size_map"),
    [
        (64, {"features.18.0.weight": 1}),  # B's blocks are 1x1, A's windows 2x2
        (128, {"features.17.conv.2.weight": 4}),  # A's windows 4x4, B's blocks 2x2
    ],
)
def test_pairs_that_do_not_line_up_are_left_alone(tmp_path: Path, size: int, patch_size_map: dict) -> None:
    compiled = _compile_mobilenet(tmp_path, "frozen", size, patch_size_map)
    assert gradient_filter_fusion.find_fusions(gs.import_onnx(compiled.filtered), compiled.plan) == []
    assert _signature(compiled.fused) == _signature(compiled.filtered)


class _SpatialScale(torch.nn.Module):
    """x * m with a fixed [1, C, H, W] m: linear, but not one factor per channel."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.register_buffer("m", torch.linspace(0.5, 1.5, channels * size * size).reshape(1, channels, size, size))

    def forward(self, x):
        return x * self.m


class _Pair(torch.nn.Module):
    """conv A (bias) -> BN -> [between] -> conv B (stride 2, bias) -> ReLU -> flatten -> linear.

    The flatten head keeps g_y_B different in every pixel; A's 4x4 windows and B's
    stride-2 2x2 patches (4x4 input blocks) both hang one row over each border of the
    10x10 map, so the border blocks hold 3 and the middle ones 4 rows.
    """

    def __init__(self, between: str) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.between = {
            "nothing": torch.nn.Identity(),
            "relu6": torch.nn.ReLU6(),
            "spatial_scale": _SpatialScale(6, 10),
        }[between]
        self.conv_b = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        y = torch.relu(self.conv_b(self.between(self.bn(self.conv_a(x)))))
        return self.head(y.flatten(1))


def _compile_pair(tmp_path: Path, bn_mode: str, between: str = "nothing") -> Compiled:
    from models.export import export_onnx  # imports torch: only after zoo_helpers' importorskip

    torch.manual_seed(0)
    model = _Pair(between)
    randomize_batchnorm(model)
    model.eval()
    onnx_path = export_onnx(model, tmp_path / "pair.onnx", input_shape=(1, 3, 10, 10))
    config = CompileConfig(
        filter_layers=2, batch_size=3, bn_mode=bn_mode, patch_size_map={"conv_a.weight": 4, "conv_b.weight": 2}
    )
    rng = np.random.default_rng(3)
    batch = (rng.standard_normal((3, 3, 10, 10)).astype(np.float32), rng.integers(0, 10, size=3).astype(np.int64))
    return _compile(onnx_path, tmp_path, config, batch)


@pytest.mark.parametrize("bn_mode", ["eval", "frozen"])
def test_unaligned_pair_with_biases(tmp_path: Path, bn_mode: str) -> None:
    compiled = _compile_pair(tmp_path, bn_mode)
    onnx.checker.check_model(compiled.fused, full_check=True)
    graph = gs.import_onnx(compiled.filtered)
    [fusion] = gradient_filter_fusion.find_fusions(graph, compiled.plan)
    lower, upper = compiled.plan.conv(fusion.lower), compiled.plan.conv(fusion.upper)
    assert fusion.upper_geometry.patch == (4, 4) and fusion.lower_geometry.g_pads == (1, 1, 1, 1)
    assert not fusion.pooled_holds_sums
    counts = geometry.block_counts(fusion.upper_geometry)
    np.testing.assert_array_equal(counts, np.outer([3, 4, 3], [3, 4, 3]))

    # A's bias gradient reads g^_A (count-weighted), which the fusion now writes from B's patches.
    reads = {n.name: n.input[0] for n in compiled.fused.graph.node}
    writers = {out: n.name for n in compiled.fused.graph.node for out in n.output}
    assert reads[f"{lower.node}/gf/bias_samples_rows"] == f"{lower.node}/gf/g_pool"
    assert writers[f"{lower.node}/gf/g_pool"].startswith(f"{lower.node}/gf/fuse/")
    assert not _pool_nodes(compiled.fused, lower.node)
    assert f"{lower.output}_grad" not in _full_resolution_outputs(compiled.fused, lower.y_shape)
    assert bool(_upsample_nodes(compiled.fused, upper.node)) == (bn_mode == "eval")
    _assert_same_gradients(compiled)


# relu6: exported as Clip, whose ORT gradient multiplies by a full-resolution mask.
# spatial_scale: a Mul by a known [1, C, H, W] constant, linear but different in every pixel.
@pytest.mark.parametrize("between", ["relu6", "spatial_scale"])
def test_non_per_channel_op_between_blocks_the_fusion(tmp_path: Path, between: str) -> None:
    compiled = _compile_pair(tmp_path, "frozen", between)
    assert gradient_filter_fusion.find_fusions(gs.import_onnx(compiled.filtered), compiled.plan) == []
    assert _signature(compiled.fused) == _signature(compiled.filtered)


class _Chain(torch.nn.Module):
    """conv A -> BN -> conv B (1x1) -> BN -> conv C -> ReLU -> flatten -> linear: two pairs share B."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = torch.nn.BatchNorm2d(6)
        self.conv_b = torch.nn.Conv2d(6, 5, 1)
        self.bn_b = torch.nn.BatchNorm2d(5)
        self.conv_c = torch.nn.Conv2d(5, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        y = self.conv_c(self.bn_b(self.conv_b(self.bn_a(self.conv_a(x)))))
        return self.head(torch.relu(y).flatten(1))


@pytest.mark.parametrize("bn_mode", ["eval", "frozen"])
def test_chain_of_three_fuses_both_pairs(tmp_path: Path, bn_mode: str) -> None:
    from models.export import export_onnx  # imports torch: only after zoo_helpers' importorskip

    torch.manual_seed(0)
    model = _Chain()
    randomize_batchnorm(model)
    model.eval()
    onnx_path = export_onnx(model, tmp_path / "chain.onnx", input_shape=(1, 3, 12, 12))
    # r=3 on 12x12 maps: aligned 3x3 windows, B's output pool is itself a fused pool.
    config = CompileConfig(filter_layers=3, batch_size=2, bn_mode=bn_mode, patch_size=3)
    rng = np.random.default_rng(5)
    batch = (rng.standard_normal((2, 3, 12, 12)).astype(np.float32), rng.integers(0, 10, size=2).astype(np.int64))
    compiled = _compile(onnx_path, tmp_path, config, batch)
    fusions = gradient_filter_fusion.find_fusions(gs.import_onnx(compiled.filtered), compiled.plan)
    assert [(f.lower, f.upper) for f in fusions] == [("/conv_a/Conv", "/conv_b/Conv"), ("/conv_b/Conv", "/conv_c/Conv")]
    for conv in ("/conv_a/Conv", "/conv_b/Conv"):
        assert not _pool_nodes(compiled.fused, conv)
    if bn_mode == "frozen":
        assert not _upsample_nodes(compiled.fused, "/conv_b/Conv") and not _upsample_nodes(
            compiled.fused, "/conv_c/Conv"
        )
    _assert_same_gradients(compiled)


class _PoolingBranch(torch.nn.Module):
    """ASPP in small: a frozen 1x1 branch and an image-pooling branch (GAP -> conv -> ReLU -> broadcast),
    concatenated and projected. Only the pooling branch's slice of the projection's input gradient is
    used, and only summed over space (the Expand gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.branch = torch.nn.Conv2d(6, 5, 1)
        self.pool_conv = torch.nn.Conv2d(6, 4, 1)
        self.project = torch.nn.Conv2d(9, 7, 1, bias=False)
        self.head = torch.nn.Linear(7 * 7 * 7, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        branch = torch.relu(self.branch(x))
        # After the 1x1 branch, so that the last two convs are the projection and this one.
        pooled = torch.relu(self.pool_conv(torch.nn.functional.adaptive_avg_pool2d(x, 1)))
        branches = torch.cat([branch, pooled.expand(-1, -1, 7, 7)], dim=1)
        return self.head(torch.relu(self.project(branches)).flatten(1))


def test_split_of_upsampled_gradient_is_summed_at_patch_resolution(tmp_path: Path) -> None:
    from models.export import export_onnx  # imports torch: only after zoo_helpers' importorskip

    torch.manual_seed(0)
    onnx_path = export_onnx(_PoolingBranch().eval(), tmp_path / "aspp.onnx", input_shape=(1, 3, 7, 7))
    # 7x7 with r=2: 4x4 patches, the last row and column of blocks hang over the border (counts 2, 1).
    config = CompileConfig(filter_layers=2, batch_size=3, patch_size_map={"pool_conv.weight": 1, "project.weight": 2})
    rng = np.random.default_rng(5)
    batch = (rng.standard_normal((3, 3, 7, 7)).astype(np.float32), rng.integers(0, 10, size=3).astype(np.int64))
    compiled = _compile(onnx_path, tmp_path, config, batch)
    onnx.checker.check_model(compiled.fused, full_check=True)
    project = next(layer for layer in compiled.plan.convs if layer.weight == "project.weight")
    assert set(compiled.plan.filtered) == {project.node, "/pool_conv/Conv"}

    split_ops = ("Split", "SplitTraining")
    assert any(n.op_type in split_ops for n in compiled.filtered.graph.node)
    assert not any(n.op_type in split_ops for n in compiled.fused.graph.node)
    assert _upsample_nodes(compiled.filtered, project.node) and not _upsample_nodes(compiled.fused, project.node)
    # ORT's gradient of the pooling branch's slice (the Expand's output gradient) is never materialised.
    assert not [name for name in _full_resolution_outputs(compiled.fused, (3, 4, 7, 7)) if name.endswith("_grad")]
    assert [name for name in _full_resolution_outputs(compiled.filtered, (3, 4, 7, 7)) if name.endswith("_grad")]
    _assert_same_gradients(compiled)
