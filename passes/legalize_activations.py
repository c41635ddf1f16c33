"""Rewrite activations that onnxruntime-training 1.19 cannot differentiate into ones it can.

Contract
--------
Input: any loaded model (legalize stage, no Plan yet).
Output: the same function, with every HardSigmoid, HardSwish, Elu, Selu, Celu, Softsign
node (and Softplus, Mish, PRelu) replaced by elementwise standard ops that have ORT gradients and CPU
gradient kernels (Mul, Add, Sub, Div, Clip, Min, Exp, Log, Tanh, Abs, Relu). Each rewrite follows the op's ONNX definition,
attributes included, so the forward values agree with ORT's kernels to float rounding:

    HardSigmoid(x) = Clip(alpha * x + beta, 0, 1)
    HardSwish(x)   = x * HardSigmoid(x; alpha=1/6, beta=1/2)
    Elu(x)         = Relu(x) + alpha * (Exp(Min(x, 0)) - 1)
    Selu(x)        = gamma * Elu(x; alpha)
    Celu(x)        = Relu(x) + alpha * (Exp(Min(x, 0) / alpha) - 1)
    Softsign(x)    = x / (1 + |x|)
    Softplus(x)    = Log(Exp(Min(x, 20)) + 1) + Relu(x - 20)
    Mish(x)        = x * Tanh(Softplus(x))
    PRelu(x, s)    = Relu(x) + s * Min(x, 0)   (s stays the node's own input, so it still trains)

Softplus switches to the identity above 20, as PyTorch does, so Exp cannot overflow; below
about -17 it returns 0 where the true value is under 6e-8 (its gradient there is still exp(x)).

ORT's gradient builder has no entry for these ops ("The gradient builder has not been
registered: HardSigmoid"), so without this pass MobileNetV3-style models cannot train past
their first squeeze-excitation block. The rewritten nodes keep the original output tensor,
so names other nodes and the graph outputs read stay valid. Other ops pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .emitter import Emitter
from .names import NameAllocator

STAGE: Stage = "legalize"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_LOG = pass_logger(__name__)


def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    names = NameAllocator(graph)
    for node in list(graph.nodes):
        rewrite = REWRITES.get(node.op)
        if rewrite is None or node.domain not in ("", "ai.onnx", None):
            continue
        x, y = node.inputs[0], node.outputs[0]
        node.outputs.clear()  # the rewrite writes y; the old node is left dangling for cleanup
        emit = Emitter(graph, names, node.name or y.name)
        rewrite(emit, node, x, y)
        _LOG.debug("%s %s -> standard ops", node.op, node.name)
    return graph


def _scalar(emit: Emitter, local: str, value: float) -> gs.Constant:
    return emit.constant_node(local, np.array(value, dtype=np.float32))


def _hard_sigmoid(emit: Emitter, x: gs.Tensor, alpha: float, beta: float, into: gs.Variable | None) -> gs.Variable:
    scaled = emit.op("Mul", "scaled", [x, _scalar(emit, "alpha", alpha)])
    shifted = emit.op("Add", "shifted", [scaled, _scalar(emit, "beta", beta)])
    return emit.op("Clip", "clipped", [shifted, _scalar(emit, "zero", 0.0), _scalar(emit, "one", 1.0)], into=into)


def _rewrite_hard_sigmoid(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    _hard_sigmoid(emit, x, node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5), into=y)


def _rewrite_hard_swish(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    gate = _hard_sigmoid(emit, x, 1.0 / 6.0, 0.5, into=None)
    emit.op("Mul", "gated", [x, gate], into=y)


def _negative_exp_part(emit: Emitter, x: gs.Tensor, alpha: float, inner_scale: float) -> gs.Variable:
    """alpha * (exp(min(x, 0) * inner_scale) - 1): the negative branch of the ELU family."""
    negative = emit.op("Min", "negative", [x, _scalar(emit, "zero", 0.0)])
    if inner_scale != 1.0:
        negative = emit.op("Mul", "negative_scaled", [negative, _scalar(emit, "inner_scale", inner_scale)])
    exp = emit.op("Exp", "exp", [negative])
    minus_one = emit.op("Sub", "exp_minus_one", [exp, _scalar(emit, "one", 1.0)])
    return emit.op("Mul", "negative_part", [minus_one, _scalar(emit, "alpha", alpha)])


def _elu_like(emit: Emitter, x: gs.Tensor, alpha: float, inner_scale: float, into: gs.Variable | None):
    positive = emit.op("Relu", "positive", [x])
    return emit.op("Add", "elu", [positive, _negative_exp_part(emit, x, alpha, inner_scale)], into=into)


def _rewrite_elu(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    _elu_like(emit, x, node.attrs.get("alpha", 1.0), 1.0, into=y)


def _rewrite_selu(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    alpha = node.attrs.get("alpha", 1.67326319217681884765625)
    gamma = node.attrs.get("gamma", 1.05070102214813232421875)
    elu = _elu_like(emit, x, alpha, 1.0, into=None)
    emit.op("Mul", "selu", [elu, _scalar(emit, "gamma", gamma)], into=y)


def _rewrite_celu(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    alpha = node.attrs.get("alpha", 1.0)
    _elu_like(emit, x, alpha, 1.0 / alpha, into=y)


def _rewrite_softsign(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    magnitude = emit.op("Abs", "abs", [x])
    denominator = emit.op("Add", "denominator", [magnitude, _scalar(emit, "one", 1.0)])
    emit.op("Div", "softsign", [x, denominator], into=y)


SOFTPLUS_LINEAR_ABOVE = 20.0


def _softplus(emit: Emitter, x: gs.Tensor, into: gs.Variable | None) -> gs.Variable:
    threshold = _scalar(emit, "threshold", SOFTPLUS_LINEAR_ABOVE)
    bounded = emit.op("Min", "bounded", [x, threshold])
    exp = emit.op("Exp", "exp", [bounded])
    log = emit.op("Log", "log1p_exp", [emit.op("Add", "exp_plus_one", [exp, _scalar(emit, "one", 1.0)])])
    excess = emit.op("Relu", "excess", [emit.op("Sub", "above", [x, threshold])])
    return emit.op("Add", "softplus", [log, excess], into=into)


def _rewrite_softplus(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    _softplus(emit, x, into=y)


def _rewrite_mish(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    gate = emit.op("Tanh", "tanh", [_softplus(emit, x, into=None)])
    emit.op("Mul", "mish", [x, gate], into=y)


def _rewrite_prelu(emit: Emitter, node: gs.Node, x: gs.Tensor, y: gs.Variable) -> None:
    positive = emit.op("Relu", "positive", [x])
    negative = emit.op("Min", "negative", [x, _scalar(emit, "zero", 0.0)])
    sloped = emit.op("Mul", "sloped", [negative, node.inputs[1]])
    emit.op("Add", "prelu", [positive, sloped], into=y)


Rewrite = Callable[[Emitter, gs.Node, gs.Tensor, gs.Variable], None]

REWRITES: dict[str, Rewrite] = {
    "HardSigmoid": _rewrite_hard_sigmoid,
    "HardSwish": _rewrite_hard_swish,
    "Elu": _rewrite_elu,
    "Selu": _rewrite_selu,
    "Celu": _rewrite_celu,
    "Softsign": _rewrite_softsign,
    "Softplus": _rewrite_softplus,
    "Mish": _rewrite_mish,
    "PRelu": _rewrite_prelu,
}
