"""passes/lower_softmax_grad.py: the four softmax gradients against onnxruntime-training's kernels,
and against a numpy Jacobian.

Each case runs the forward (Log)Softmax at the opset whose axis semantics the gradient op follows
(11: coerce to 2-D at `axis`; 13: the one axis) and the com.microsoft gradient on its output, in the
training build, then the graph lowered by the one pass, on the same random inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gfcompile.passrunner import run_passes
from passes import lower_softmax_grad
from passes.base import Plan

MS = "com.microsoft"
# gradient op -> (forward op, the opset whose semantics it follows)
FORWARD = {
    "SoftmaxGrad": ("Softmax", 11),
    "SoftmaxGrad_13": ("Softmax", 13),
    "LogSoftmaxGrad": ("LogSoftmax", 11),
    "LogSoftmaxGrad_13": ("LogSoftmax", 13),
}


def _model(op: str, shape: tuple[int, ...], axis: int | None) -> onnx.ModelProto:
    forward, opset = FORWARD[op]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node(forward, ["x"], ["y"], **attrs),
        helper.make_node(op, ["dy", "y"], ["dx"], domain=MS, **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "softmax",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("x", "dy")],
        [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["dx"], feeds)[0]


def _feeds(shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (3 * rng.standard_normal(shape)).astype(np.float32) for name in ("x", "dy")}


CASES = [(op, shape, axis) for op in FORWARD for shape, axis in (((4, 7), None), ((2, 3, 4, 5), 0), ((2, 3, 4, 5), -2))]


@pytest.mark.parametrize(("op", "shape", "axis"), CASES, ids=[f"{o}-{len(s)}d-axis{a}" for o, s, a in CASES])
def test_softmax_grad_lowering_matches_ort_kernel(op: str, shape: tuple, axis: int | None) -> None:
    model = _model(op, shape, axis)
    feeds = _feeds(shape, seed=len(shape) + (axis or 0))
    lowered = run_passes((lower_softmax_grad,), model, Plan(convs=[]), stage="lower")
    assert all(n.domain in ("", "ai.onnx") and onnx.defs.has(n.op_type) for n in lowered.graph.node)
    np.testing.assert_allclose(_run(lowered, feeds), _run(model, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", list(FORWARD))
def test_softmax_grad_lowering_is_the_jacobian_transpose(op: str) -> None:
    """Independent of ORT: dX = J^T dY with J the float64 Jacobian of the (log-)softmax over the
    normalized axes (for the pre-13 ops, axes 1.. of a (2, 3, 4) input: 12 values per row)."""
    shape = (2, 3, 4)
    feeds = _feeds(shape, seed=7)
    lowered = run_passes((lower_softmax_grad,), _model(op, shape, 1), Plan(convs=[]), stage="lower")
    x, dy = feeds["x"].astype(np.float64), feeds["dy"].astype(np.float64)
    whole_row = not op.endswith("_13")
    rows_x = x.reshape(2, 12) if whole_row else np.moveaxis(x, 1, -1).reshape(8, 3)
    rows_dy = dy.reshape(2, 12) if whole_row else np.moveaxis(dy, 1, -1).reshape(8, 3)
    grads = []
    for row_x, row_dy in zip(rows_x, rows_dy, strict=True):
        p = np.exp(row_x - row_x.max())
        p /= p.sum()
        # d softmax_i / d x_j = p_i (delta_ij - p_j);  d log_softmax_i / d x_j = delta_ij - p_j
        jacobian = np.eye(len(p)) - p[None, :]
        if not op.startswith("Log"):
            jacobian = p[:, None] * jacobian
        grads.append(jacobian.T @ row_dy)
    expected = np.array(grads)
    expected = expected.reshape(shape) if whole_row else np.moveaxis(expected.reshape(2, 4, 3), -1, 1)
    np.testing.assert_allclose(_run(lowered, feeds), expected, rtol=1e-4, atol=1e-5)


def test_reduced_axes_follow_the_opset_semantics() -> None:
    assert lower_softmax_grad.reduced_axes("SoftmaxGrad", None, 4) == [1, 2, 3]
    assert lower_softmax_grad.reduced_axes("SoftmaxGrad", -2, 4) == [2, 3]
    assert lower_softmax_grad.reduced_axes("SoftmaxGrad_13", None, 4) == [3]
    assert lower_softmax_grad.reduced_axes("LogSoftmaxGrad_13", 1, 4) == [1]
