"""Lower train-mode batch norm (`--bn-mode train`), com.microsoft `BatchNormInternal` and
`BatchNormalizationGrad`, to standard ops.

Contract, per channel over the m = N*H*W values of a batch (biased variance, as ORT):

    mean = sum(X) / m,  inv_std = 1 / sqrt(sum((X - mean)^2) / m + eps),  xhat = (X - mean) * inv_std
    Y = xhat * scale + B
    dB = sum(dY),  dscale = sum(dY * xhat)
    dX = scale * inv_std * (dY - dB / m - xhat * dscale / m)

BatchNormInternal's saved_mean and saved_inv_std outputs keep their names (the grad reads them).
A training step returns no BN statistics, so its running-statistics outputs are never read; the
lowering refuses a graph that reads them rather than guess ORT's momentum convention.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN, Emitter
from .lowering import detach, emitter_for, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op == "BatchNormInternal"]:
        _forward(graph, emitter_for(graph, names, node), node)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op == "BatchNormalizationGrad"]:
        _backward(emitter_for(graph, names, node), node)
    return graph


def _per_channel_count(shape: tuple[int, ...]) -> np.ndarray:
    return np.array(np.prod(shape) / shape[1], dtype=np.float32)


def _channel_view(emit: Emitter, local: str, tensor: gs.Tensor, shape: tuple[int, ...]) -> gs.Variable:
    return emit.reshape(local, tensor, [1, shape[1]] + [1] * (len(shape) - 2))


def _forward(graph: gs.Graph, emit: Emitter, node: gs.Node) -> None:
    x, scale, bias = node.inputs[0], node.inputs[1], node.inputs[2]
    shape = static_shape(x, f"BatchNormInternal {node.name!r}")
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    outputs = detach(node) + [None] * 5
    y, running_mean, running_var, saved_mean, saved_inv_std = outputs[:5]
    for statistic in (running_mean, running_var):
        if statistic is not None and (statistic.outputs or statistic in graph.outputs):
            raise ValueError(f"cannot lower BatchNormInternal {node.name!r}: its running statistics are read")
    axes = emit.ints([0, *range(2, len(shape))])
    count = emit.const("count", _per_channel_count(shape))
    mean = emit.op("Div", "mean", [emit.op("ReduceSum", "sum", [x, axes], attrs={"keepdims": 1}), count])
    centred = emit.op("Sub", "centred", [x, mean])
    squares = emit.op("Mul", "squares", [centred, centred])
    variance = emit.op(
        "Div", "variance", [emit.op("ReduceSum", "sum_sq", [squares, axes], attrs={"keepdims": 1}), count]
    )
    shifted = emit.op("Add", "variance_eps", [variance, emit.const("epsilon", np.array(epsilon, np.float32))])
    inv_std = emit.op("Reciprocal", "inv_std", [emit.op("Sqrt", "std", [shifted])])
    normalised = emit.op("Mul", "xhat", [centred, inv_std])
    scaled = emit.op("Mul", "scaled", [normalised, _channel_view(emit, "scale_c", scale, shape)])
    emit.op("Add", "y", [scaled, _channel_view(emit, "bias_c", bias, shape)], into=y)
    if saved_mean is not None:
        emit.reshape("saved_mean", mean, [shape[1]], into=saved_mean)
    if saved_inv_std is not None:
        emit.reshape("saved_inv_std", inv_std, [shape[1]], into=saved_inv_std)


def _backward(emit: Emitter, node: gs.Node) -> None:
    grad_y, x, scale, mean, inv_std = node.inputs[:5]
    shape = static_shape(x, f"BatchNormalizationGrad {node.name!r}")
    grad_x, grad_scale, grad_bias = (detach(node) + [None, None, None])[:3]
    axes = emit.ints([0, *range(2, len(shape))])
    count = emit.const("count", _per_channel_count(shape))
    inv_std_c = _channel_view(emit, "inv_std_c", inv_std, shape)
    centred = emit.op("Sub", "centred", [x, _channel_view(emit, "mean_c", mean, shape)])
    xhat = emit.op("Mul", "xhat", [centred, inv_std_c])
    sum_grad = emit.op("ReduceSum", "sum_dy", [grad_y, axes], attrs={"keepdims": 1})
    weighted = emit.op("Mul", "dy_xhat", [grad_y, xhat])
    sum_grad_xhat = emit.op("ReduceSum", "sum_dy_xhat", [weighted, axes], attrs={"keepdims": 1})
    if grad_bias is not None:
        emit.reshape("dbias", sum_grad, [shape[1]], into=grad_bias)
    if grad_scale is not None:
        emit.reshape("dscale", sum_grad_xhat, [shape[1]], into=grad_scale)
    if grad_x is not None:
        mean_grad = emit.op("Div", "mean_dy", [sum_grad, count])
        mean_grad_xhat = emit.op("Div", "mean_dy_xhat", [sum_grad_xhat, count])
        projected = emit.op("Mul", "projected", [xhat, mean_grad_xhat])
        centred_grad = emit.op("Sub", "centred_dy", [emit.op("Sub", "dy_minus_mean", [grad_y, mean_grad]), projected])
        gain = emit.op("Mul", "gain", [_channel_view(emit, "scale_c", scale, shape), inv_std_c])
        emit.op("Mul", "dx", [centred_grad, gain], into=grad_x)
