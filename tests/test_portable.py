"""Portable training artifacts: the lowering of onnxruntime-training's ops to standard ONNX ops,
the pure-function train step, and the plain-onnxruntime runtime backend.

The reference for every lowered op is onnxruntime-training's own kernel for the op it replaces
(the training build registers them in its InferenceSession), run on the same random inputs.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gfcompile.passrunner import run_passes
from gfcompile.pipeline import LOWER_PASSES
from passes.base import Plan

MS = "com.microsoft"


def _model(nodes, inputs: dict[str, tuple], outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    def value(name, spec):
        shape, dtype = spec
        return helper.make_tensor_value_info(name, dtype, list(shape))

    graph = helper.make_graph(
        nodes,
        "case",
        [value(n, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(inputs: dict[str, tuple], seed: int = 0, overrides: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in inputs.items():
        if dtype == TensorProto.FLOAT:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    feeds.update(overrides or {})
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def _standard_only(model: onnx.ModelProto) -> None:
    foreign = [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)]
    assert not foreign, foreign


def _check_lowering(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    expected = _run(model, feeds)
    lowered = run_passes(LOWER_PASSES, model, Plan(convs=[]), stage="lower")
    _standard_only(lowered)
    actual = _run(lowered, feeds)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


CONV_CASES = {
    # (N, C, H, W), (M, k), strides, pads, dilations, group
    "3x3": ((2, 4, 9, 9), (6, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "3x3_stride2_odd": ((2, 4, 9, 10), (6, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "5x3_asym_pads_stride": ((1, 3, 11, 8), (4, (5, 3)), (3, 2), (2, 0, 1, 1), (1, 1), 1),
    "dilated": ((2, 4, 12, 12), (4, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "dilated_strided": ((2, 4, 13, 13), (4, 3), (2, 2), (2, 2, 2, 2), (2, 2), 1),
    "grouped": ((2, 6, 8, 8), (9, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    "depthwise_stride2": ((2, 8, 9, 9), (8, 3), (2, 2), (1, 1, 1, 1), (1, 1), 8),
    "pointwise": ((3, 8, 5, 5), (16, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "pointwise_stride2": ((3, 8, 7, 6), (16, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "pointwise_batch1": ((1, 8, 5, 5), (4, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "7x7_stem": ((2, 3, 16, 16), (8, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_grad_lowering_matches_ort_kernel(case: str) -> None:
    x_shape, (m, k), strides, pads, dilations, group = CONV_CASES[case]
    kernel = (k, k) if isinstance(k, int) else k
    n, c, h, w = x_shape
    out = [
        (size + pads[a] + pads[a + 2] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
        for a, size in enumerate((h, w))
    ]
    inputs = {
        "dy": ((n, m, *out), TensorProto.FLOAT),
        "x": (x_shape, TensorProto.FLOAT),
        "w": ((m, c // group, *kernel), TensorProto.FLOAT),
    }
    node = helper.make_node(
        "ConvGrad",
        ["dy", "x", "w"],
        ["dx", "dw", "db"],
        domain=MS,
        kernel_shape=list(kernel),
        strides=list(strides),
        pads=list(pads),
        dilations=list(dilations),
        group=group,
    )
    _check_lowering(_model([node], inputs, ["dx", "dw", "db"]), _feeds(inputs))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("spatial", [(), (3, 4)])
def test_softmax_cross_entropy_grad_lowering(reduction: str, spatial: tuple) -> None:
    n, classes = 4, 5
    rng = np.random.default_rng(3)
    labels = rng.integers(0, classes, size=(n, *spatial)).astype(np.int64)
    labels.flat[1] = 255  # an ignored label
    inputs = {"logits": ((n, classes, *spatial), TensorProto.FLOAT), "labels": ((n, *spatial), TensorProto.INT64)}
    nodes = [
        helper.make_node(
            "SoftmaxCrossEntropyLoss",
            ["logits", "labels"],
            ["loss", "log_prob"],
            reduction=reduction,
            ignore_index=255,
        ),
        helper.make_node("Constant", [], ["dloss"], value=helper.make_tensor("d", TensorProto.FLOAT, [], [0.7])),
        helper.make_node(
            "SoftmaxCrossEntropyLossGrad",
            ["dloss", "log_prob", "labels"],
            ["dlogits"],
            domain=MS,
            reduction=reduction,
            ignore_index=255,
        ),
    ]
    _check_lowering(_model(nodes, inputs, ["loss", "dlogits"]), _feeds(inputs, overrides={"labels": labels}))


def test_batchnorm_train_mode_lowering() -> None:
    shape, channels = (4, 3, 5, 5), 3
    inputs = {
        "x": (shape, TensorProto.FLOAT),
        "dy": (shape, TensorProto.FLOAT),
        "scale": ((channels,), TensorProto.FLOAT),
        "bias": ((channels,), TensorProto.FLOAT),
        "mean": ((channels,), TensorProto.FLOAT),
        "var": ((channels,), TensorProto.FLOAT),
    }
    nodes = [
        helper.make_node(
            "BatchNormInternal",
            ["x", "scale", "bias", "mean", "var"],
            ["y", "running_mean", "running_var", "saved_mean", "saved_inv_std"],
            domain=MS,
            epsilon=1e-5,
            momentum=0.9,
            training_mode=1,
        ),
        helper.make_node(
            "BatchNormalizationGrad",
            ["dy", "x", "scale", "saved_mean", "saved_inv_std"],
            ["dx", "dscale", "dbias"],
            domain=MS,
            epsilon=1e-5,
        ),
    ]
    feeds = _feeds(inputs, overrides={"var": np.ones(channels, np.float32)})
    _check_lowering(_model(nodes, inputs, ["y", "dx", "dscale", "dbias"]), feeds)


def test_max_pool_grad_lowering_with_overlapping_windows() -> None:
    inputs = {"x": ((2, 3, 9, 9), TensorProto.FLOAT), "dy": ((2, 3, 5, 5), TensorProto.FLOAT)}
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("MaxPool", ["x"], ["y", "indices"], **attrs),
        helper.make_node("MaxPoolGrad", ["dy", "indices"], ["dx"], **attrs),
    ]
    model = _model(nodes, inputs, ["dx"])
    # ORT's MaxPoolGrad kernel takes dX's shape from the graph (it crashes without one).
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 9, 9]))
    _check_lowering(model, _feeds(inputs))


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool_grad_lowering(count_include_pad: int) -> None:
    inputs = {"dy": ((2, 3, 4, 4), TensorProto.FLOAT)}
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": count_include_pad}
    node = helper.make_node("AveragePoolGrad", ["dy"], ["dx"], **attrs)
    model = _model([node], inputs, ["dx"])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 8, 8]))
    model.graph.value_info.append(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 8, 8]))
    _check_lowering(model, _feeds(inputs))


def test_small_training_ops_lowering() -> None:
    inputs = {
        "a": ((2, 3, 4), TensorProto.FLOAT),
        "b": ((2, 5, 4), TensorProto.FLOAT),
        "dy": ((2, 3, 4), TensorProto.FLOAT),
        "s": ((), TensorProto.FLOAT),
    }
    nodes = [
        helper.make_node("FusedMatMul", ["a", "b"], ["ab"], domain=MS, transB=1, alpha=0.5),
        helper.make_node("ReluGrad", ["dy", "a"], ["relu_dx"], domain=MS),
        helper.make_node("Scale", ["dy", "s"], ["down"], domain=MS, scale_down=1),
        # ORT's PassThrough aliases its inputs, which a graph input cannot be.
        helper.make_node("Neg", ["a"], ["neg_a"]),
        helper.make_node("Neg", ["dy"], ["neg_dy"]),
        helper.make_node("PassThrough", ["neg_a", "neg_dy"], ["a_alias", "dy_alias"], domain=MS),
        helper.make_node("Sub", ["a_alias", "dy_alias"], ["alias_difference"]),
        helper.make_node("ConcatTraining", ["a", "dy"], ["cat", "lengths"], domain=MS, axis=1),
        helper.make_node("SplitTraining", ["cat", "lengths"], ["part_a", "part_dy"], domain=MS, axis=1),
    ]
    outputs = ["ab", "relu_dx", "down", "alias_difference", "cat", "part_a", "part_dy"]
    _check_lowering(_model(nodes, inputs, outputs), _feeds(inputs, overrides={"s": np.array(4.0, np.float32)}))


def test_an_op_without_lowering_is_named_in_one_line(tmp_path) -> None:
    from gfcompile.errors import GfError
    from gfcompile.train_step import check_standard_ops

    inputs = {"dy": ((2, 3), TensorProto.FLOAT), "x": ((2, 3), TensorProto.FLOAT)}
    node = helper.make_node("GeluGrad", ["dy", "x"], ["dx"], domain=MS, name="gelu_backward")
    model = run_passes(LOWER_PASSES, _model([node], inputs, ["dx"]), Plan(convs=[]), stage="lower")
    with pytest.raises(GfError, match=r"com\.microsoft::GeluGrad.*gelu_backward") as raised:
        check_standard_ops(model)
    assert "\n" not in str(raised.value)


def _op_histogram(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter((n.domain or "ai.onnx") + "::" + n.op_type for n in model.graph.node)
