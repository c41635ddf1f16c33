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

from .base import Plan, Stage

STAGE: Stage = "forward"
REQUIRES: tuple[str, ...] = ("frozen_bn_fold",)
FACTS: tuple[str, ...] = ("static_shapes",)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    trainable = set(plan.trainable_params)
    for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
        x, gamma, beta, mean, var = bn.inputs[:5]
        if not all(isinstance(t, gs.Constant) for t in (mean, var)):
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
            scale, shift = _learnable_scale_shift(graph, prefix, gamma, beta, mean, inv_std, broadcast)
        else:
            scale_values = gamma.values.astype(np.float64) * inv_std
            shift_values = beta.values.astype(np.float64) - mean.values.astype(np.float64) * scale_values
            scale = gs.Constant(f"{prefix}/scale", scale_values.astype(np.float32).reshape(broadcast))
            shift = gs.Constant(f"{prefix}/shift", shift_values.astype(np.float32).reshape(broadcast))
        scaled = graph.layer(op="Mul", name=f"{prefix}/mul", inputs=[x, scale], outputs=[f"{prefix}/scaled"])[0]
        graph.layer(op="Add", name=f"{prefix}/add", inputs=[scaled, shift], outputs=[y])
    return graph


def _learnable_scale_shift(graph, prefix, gamma, beta, mean, inv_std, broadcast):
    inv_std_c = gs.Constant(f"{prefix}/inv_std", inv_std)
    shape_c = gs.Constant(f"{prefix}/channel_shape", broadcast)
    mean_c = gs.Constant(f"{prefix}/running_mean", mean.values.astype(np.float32))
    scale = graph.layer(op="Mul", name=f"{prefix}/scale", inputs=[gamma, inv_std_c], outputs=[f"{prefix}/scale"])[0]
    mean_scaled = graph.layer(
        op="Mul", name=f"{prefix}/mean_scaled", inputs=[mean_c, scale], outputs=[f"{prefix}/mean_scaled"]
    )[0]
    shift = graph.layer(op="Sub", name=f"{prefix}/shift", inputs=[beta, mean_scaled], outputs=[f"{prefix}/shift"])[0]
    scale4 = graph.layer(op="Reshape", name=f"{prefix}/scale4", inputs=[scale, shape_c], outputs=[f"{prefix}/scale4"])[
        0
    ]
    shift4 = graph.layer(op="Reshape", name=f"{prefix}/shift4", inputs=[shift, shape_c], outputs=[f"{prefix}/shift4"])[
        0
    ]
    return scale4, shift4
