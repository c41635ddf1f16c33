"""Run BatchNorm in eval mode as an explicit per-channel affine.

ORT's gradient builder turns every BatchNormalization into a batch-statistics op,
which is wrong for fine-tuning with small batches. Rewriting BN as
`x * scale + shift`, with `scale = gamma / sqrt(var + eps)` and
`shift = beta - mean * scale`, keeps the running statistics frozen (they become
constants) while gamma and beta still receive exact gradients through Mul/Add.
With `plan.bn_mode == "train"`, BN of trainable layers is left to ORT.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .names import NameAllocator

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ("frozen_bn_fold",)
FACTS: tuple[str, ...] = ("static_shapes",)

_LOG = pass_logger(__name__)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    trainable = set(plan.trainable_params)
    names = NameAllocator(graph)
    for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
        x, gamma, beta, mean, var = bn.inputs[:5]
        if not all(isinstance(t, gs.Constant) for t in (mean, var)):
            _LOG.debug("%s has non-constant running statistics; left alone", bn.name)
            continue
        learns = gamma.name in trainable or beta.name in trainable
        if learns and plan.bn_mode == "train":
            continue
        channels = mean.values.shape[0]
        rank = len(x.shape) if x.shape is not None else 4
        broadcast = np.array([1, channels] + [1] * (rank - 2), dtype=np.int64)
        inv_std = (1.0 / np.sqrt(var.values.astype(np.float64) + bn.attrs.get("epsilon", 1e-5))).astype(np.float32)
        prefix = bn.name or bn.outputs[0].name
        y = bn.outputs[0]
        bn.outputs.clear()
        if learns:
            scale, shift = _learnable_scale_shift(graph, names, prefix, gamma, beta, mean, inv_std, broadcast)
        else:
            scale_values = gamma.values.astype(np.float64) * inv_std
            shift_values = beta.values.astype(np.float64) - mean.values.astype(np.float64) * scale_values
            scale = gs.Constant(names.fresh(f"{prefix}/scale"), scale_values.astype(np.float32).reshape(broadcast))
            shift = gs.Constant(names.fresh(f"{prefix}/shift"), shift_values.astype(np.float32).reshape(broadcast))
        scaled = _node(graph, names, "Mul", f"{prefix}/mul", [x, scale], f"{prefix}/scaled")
        graph.layer(op="Add", name=names.fresh(f"{prefix}/add"), inputs=[scaled, shift], outputs=[y])
    return graph


def _node(graph: gs.Graph, names: NameAllocator, op: str, name: str, inputs: list, output: str) -> gs.Variable:
    """One node whose name and output tensor name are fresh versions of `name` and `output`."""
    node_name = names.fresh(name)
    output_name = node_name if output == name else names.fresh(output)
    return graph.layer(op=op, name=node_name, inputs=inputs, outputs=[output_name])[0]


def _learnable_scale_shift(graph, names, prefix, gamma, beta, mean, inv_std, broadcast):
    inv_std_c = gs.Constant(names.fresh(f"{prefix}/inv_std"), inv_std)
    shape_c = gs.Constant(names.fresh(f"{prefix}/channel_shape"), broadcast)
    mean_c = gs.Constant(names.fresh(f"{prefix}/running_mean"), mean.values.astype(np.float32))
    scale = _node(graph, names, "Mul", f"{prefix}/scale", [gamma, inv_std_c], f"{prefix}/scale")
    mean_scaled = _node(graph, names, "Mul", f"{prefix}/mean_scaled", [mean_c, scale], f"{prefix}/mean_scaled")
    shift = _node(graph, names, "Sub", f"{prefix}/shift", [beta, mean_scaled], f"{prefix}/shift")
    scale4 = _node(graph, names, "Reshape", f"{prefix}/scale4", [scale, shape_c], f"{prefix}/scale4")
    shift4 = _node(graph, names, "Reshape", f"{prefix}/shift4", [shift, shape_c], f"{prefix}/shift4")
    return scale4, shift4
