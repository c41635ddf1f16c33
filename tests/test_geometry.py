"""passes/geometry.py: the one pad resolver (against onnxruntime's own auto_pad) and block counts."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes.base import ConvLayer
from passes.geometry import block_counts, explicit_pads, filter_geometry, window_counts


def _conv_output(size: tuple[int, int], kernel: int, stride: int, dilation: int, **pad_attrs) -> np.ndarray:
    x_value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *size])
    y_value = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        kernel_shape=[kernel] * 2,
        strides=[stride] * 2,
        dilations=[dilation] * 2,
        **pad_attrs,
    )
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, kernel, kernel], np.arange(kernel * kernel) + 1.0)
    graph = helper.make_graph([node], "conv", [x_value], [y_value], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, *size)).astype(np.float32)
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_explicit_pads_match_onnxruntime_auto_pad(mode: str) -> None:
    dilations = [1, 2] if mode == "VALID" else [1]  # ORT refuses SAME with dilation
    for size, kernel, stride, dilation in itertools.product([(7, 8), (9, 5)], [1, 2, 3], [1, 2], dilations):
        pads = explicit_pads(mode, None, size, (kernel,) * 2, (stride,) * 2, (dilation,) * 2)
        expected = _conv_output(size, kernel, stride, dilation, auto_pad=mode)
        actual = _conv_output(size, kernel, stride, dilation, pads=list(pads))
        np.testing.assert_array_equal(actual, expected, err_msg=str((mode, size, kernel, stride, dilation, pads)))


def test_explicit_pads_keep_given_pads_and_refuse_unknown_modes() -> None:
    for mode in ("NOTSET", "", b"NOTSET", b"", None):
        assert explicit_pads(mode, [1, 2, 3, 4], (8, 8), (3, 3), (1, 1), (1, 1)) == (1, 2, 3, 4)
    assert explicit_pads(None, None, (8, 8), (3, 3), (1, 1), (1, 1)) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown auto_pad 'SAME'"):
        explicit_pads("SAME", None, (8, 8), (3, 3), (1, 1), (1, 1))


def test_block_counts_count_in_image_elements() -> None:
    # 7x5 input, stride-1 3x3 conv with pad 1, r = 3: 3x2 patches of 3x3, padded to 9x6.
    layer = ConvLayer("c", 0, "x", "y", "w", None, (1, 2, 7, 5), (1, 2, 7, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    geom = filter_geometry(layer, 3)
    counts = block_counts(geom)
    assert counts.shape == geom.grid and counts.sum() == 7 * 5
    # Brute force: which block each pixel falls in, given the leading pad of the patch grid.
    brute = np.zeros(geom.grid)
    for row, col in itertools.product(range(7), range(5)):
        brute[(row + geom.x_pads[0]) // geom.patch[0], (col + geom.x_pads[1]) // geom.patch[1]] += 1
    np.testing.assert_array_equal(counts, brute)
    assert list(window_counts(10, 4, 1, 3)) == [3, 4, 3]
