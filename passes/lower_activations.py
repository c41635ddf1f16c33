"""Lower the activation ops and gradients that onnxruntime-training's graph transformers put into
training graphs (ConvNeXt's GELU, EfficientNet's SiLU, squeeze-excitation sigmoids) to standard ops.

Contract: each node is replaced by standard ops writing the same output tensor:

- `Gelu(x)` = 0.5 * x * (1 + erf(x / sqrt(2)));  `GeluGrad(dy, x)` = dy * (Phi(x) + x * phi(x)),
  with Phi and phi the standard normal CDF and density;
- `QuickGelu(x)` = x * sigmoid(alpha * x) (ORT fuses SiLU into it with alpha = 1);
  `QuickGeluGrad(dy, x)` = dy * s * (1 + alpha * x * (1 - s)), s = sigmoid(alpha * x);
- `SigmoidGrad(dy, y)` = dy * y * (1 - y);
- `LayerNormalizationGrad(dy, x, scale, mean, inv_std)` over the axes from `axis` on (D values each),
  with xhat = (x - mean) * inv_std and g = dy * scale: dbias and dscale sum dy and dy * xhat over the
  leading axes, and dx = inv_std * (g - sum(g) / D - xhat * sum(g * xhat) / D), sums over the
  normalized axes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN, Emitter
from .lowering import detach, emitter_for, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

# ORT's default for QuickGelu's alpha (the sigmoid approximation of GELU).
_QUICK_GELU_ALPHA = 1.702


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    lowerings = {
        "Gelu": _gelu,
        "GeluGrad": _gelu_grad,
        "QuickGelu": _quick_gelu,
        "QuickGeluGrad": _quick_gelu_grad,
        "SigmoidGrad": _sigmoid_grad,
        "LayerNormalizationGrad": _layer_norm_grad,
    }
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.domain == MS_DOMAIN and n.op in lowerings]:
        lowerings[node.op](emitter_for(graph, names, node), node)
    return graph


def _scalar(emit: Emitter, local: str, value: float) -> gs.Constant:
    return emit.const(local, np.array(value, dtype=np.float32))


def _normal_cdf(emit: Emitter, x: gs.Tensor) -> gs.Variable:
    scaled = emit.op("Mul", "x_over_sqrt2", [x, _scalar(emit, "inv_sqrt2", 1 / math.sqrt(2))])
    erf = emit.op("Erf", "erf", [scaled])
    return emit.op(
        "Mul", "cdf", [emit.op("Add", "one_plus_erf", [erf, _scalar(emit, "one", 1.0)]), _scalar(emit, "half", 0.5)]
    )


def _gelu(emit: Emitter, node: gs.Node) -> None:
    x = node.inputs[0]
    (y,) = detach(node)
    emit.op("Mul", "y", [x, _normal_cdf(emit, x)], into=y)


def _gelu_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, x = node.inputs[0], node.inputs[1]
    (grad_x,) = detach(node)
    squared = emit.op("Mul", "x_sq", [x, x])
    density = emit.op("Exp", "exp", [emit.op("Mul", "minus_half_x_sq", [squared, _scalar(emit, "minus_half", -0.5)])])
    density = emit.op("Mul", "pdf", [density, _scalar(emit, "inv_sqrt_2pi", 1 / math.sqrt(2 * math.pi))])
    slope = emit.op("Add", "slope", [_normal_cdf(emit, x), emit.op("Mul", "x_pdf", [x, density])])
    emit.op("Mul", "dx", [grad_y, slope], into=grad_x)


def _alpha_sigmoid(emit: Emitter, node: gs.Node, x: gs.Tensor) -> tuple[gs.Variable, float]:
    alpha = float(node.attrs.get("alpha", _QUICK_GELU_ALPHA))
    scaled = x if alpha == 1.0 else emit.op("Mul", "alpha_x", [x, _scalar(emit, "alpha", alpha)])
    return emit.op("Sigmoid", "sigmoid", [scaled]), alpha


def _quick_gelu(emit: Emitter, node: gs.Node) -> None:
    x = node.inputs[0]
    (y,) = detach(node)
    gate, _ = _alpha_sigmoid(emit, node, x)
    emit.op("Mul", "y", [x, gate], into=y)


def _quick_gelu_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, x = node.inputs[0], node.inputs[1]
    (grad_x,) = detach(node)
    gate, alpha = _alpha_sigmoid(emit, node, x)
    one = _scalar(emit, "one", 1.0)
    complement = emit.op("Sub", "one_minus_s", [one, gate])
    alpha_x = x if alpha == 1.0 else emit.op("Mul", "alpha_x_grad", [x, _scalar(emit, "alpha_grad", alpha)])
    inner = emit.op("Add", "inner", [one, emit.op("Mul", "ax_complement", [alpha_x, complement])])
    slope = emit.op("Mul", "slope", [gate, inner])
    emit.op("Mul", "dx", [grad_y, slope], into=grad_x)


def _sigmoid_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, y = node.inputs[0], node.inputs[1]
    (grad_x,) = detach(node)
    complement = emit.op("Sub", "one_minus_y", [_scalar(emit, "one", 1.0), y])
    emit.op("Mul", "dx", [emit.op("Mul", "dy_y", [grad_y, y]), complement], into=grad_x)


def _layer_norm_grad(emit: Emitter, node: gs.Node) -> None:
    grad_y, x, scale, mean, inv_std = node.inputs[:5]
    shape = static_shape(x, f"LayerNormalizationGrad {node.name!r}")
    axis = int(node.attrs.get("axis", -1)) % len(shape)
    outputs = detach(node) + [None, None, None]
    grad_x, grad_scale, grad_bias = outputs[:3]
    leading, normalized = list(range(axis)), list(range(axis, len(shape)))
    count = _scalar(emit, "count", float(np.prod(shape[axis:])))
    xhat = emit.op("Mul", "xhat", [emit.op("Sub", "centred", [x, mean]), inv_std])
    if grad_bias is not None:
        emit.op("ReduceSum", "dbias", [grad_y, emit.ints(leading)], attrs={"keepdims": 0}, into=grad_bias)
    if grad_scale is not None:
        weighted = emit.op("Mul", "dy_xhat", [grad_y, xhat])
        emit.op("ReduceSum", "dscale", [weighted, emit.ints(leading)], attrs={"keepdims": 0}, into=grad_scale)
    if grad_x is not None:
        g = emit.op("Mul", "g", [grad_y, scale])
        mean_g = emit.op("Div", "mean_g", [emit.op("ReduceSum", "sum_g", [g, emit.ints(normalized)]), count])
        g_xhat = emit.op("Mul", "g_xhat", [g, xhat])
        mean_g_xhat = emit.op(
            "Div", "mean_g_xhat", [emit.op("ReduceSum", "sum_g_xhat", [g_xhat, emit.ints(normalized)]), count]
        )
        centred = emit.op("Sub", "g_centred", [g, mean_g])
        projected = emit.op("Sub", "g_projected", [centred, emit.op("Mul", "xhat_mean", [xhat, mean_g_xhat])])
        emit.op("Mul", "dx", [projected, inv_std], into=grad_x)
