"""Lower com.microsoft `ConvGrad(dY, X, W) -> (dX, dW, dB)` to standard ONNX ops.

Contract: every ConvGrad node is replaced; its output tensors keep their names and readers.
The forward conv's geometry (kernel k, stride s, pads, dilation d, group g) is on the node.

- dX is the transposed conv of dY with the same W, strides, pads, dilations and groups; its
  `output_padding` restores the rows and columns the forward's floor division dropped.
- dW[m, c, i, j] = sum_{n, y, x} dY[n, m, y, x] * Xpad[n, c, y*s + i*d, x*s + j*d]: a correlation
  of X with dY over the batch. Written as a Conv whose "batch" is X's channels and whose kernel is
  dY (batch and channel axes swapped, strides and dilations swapped), cut to k x k. For groups,
  the g channel blocks of X become the g groups of that conv.
  A 1x1 ungrouped conv without padding is a plain matrix product, dW = sum_n dY_n X_n^T, which
  ORT runs as GEMMs instead of a conv with an (Ho x Wo)-sized kernel.
- dB sums dY over batch and space.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Plan, Stage
from .emitter import MS_DOMAIN, Emitter
from .geometry import explicit_pads
from .lowering import detach, emitter_for, present, static_shape
from .names import NameAllocator

STAGE: Stage = "lower"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    names = NameAllocator(graph)
    for node in [n for n in graph.nodes if n.op == "ConvGrad" and n.domain == MS_DOMAIN]:
        _lower(graph, names, node)
    return graph


def _geometry(node: gs.Node, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> dict:
    if len(x_shape) != 4:
        raise ValueError(f"cannot lower ConvGrad {node.name!r}: only 2-D convs are supported")
    kernel = tuple(w_shape[2:])
    strides = tuple(node.attrs.get("strides", [1, 1]))
    dilations = tuple(node.attrs.get("dilations", [1, 1]))
    pads = explicit_pads(node.attrs.get("auto_pad"), node.attrs.get("pads"), x_shape[2:], kernel, strides, dilations)
    out = tuple(
        (x_shape[2 + a] + pads[a] + pads[a + 2] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
        for a in range(2)
    )
    group = int(node.attrs.get("group", 1))
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads, "group": group, "out": out}


def _lower(graph: gs.Graph, names: NameAllocator, node: gs.Node) -> None:
    grad_y, x, w = node.inputs[0], node.inputs[1], node.inputs[2]
    x_shape = static_shape(x, f"ConvGrad {node.name!r}")
    w_shape = static_shape(w, f"ConvGrad {node.name!r}")
    geo = _geometry(node, x_shape, w_shape)
    emit = emitter_for(graph, names, node)
    grad_x, grad_w, grad_b = (present(node.outputs, i) for i in range(3))
    detach(node)
    if grad_x is not None:
        _input_gradient(emit, grad_y, w, x_shape, geo, grad_x)
    if grad_w is not None:
        if geo["kernel"] == (1, 1) and geo["group"] == 1 and geo["pads"] == (0, 0, 0, 0):
            _pointwise_weight_gradient(emit, grad_y, x, x_shape, w_shape, geo, grad_w)
        else:
            _weight_gradient(emit, grad_y, x, x_shape, w_shape, geo, grad_w)
    if grad_b is not None:
        emit.op("ReduceSum", "db", [grad_y, emit.ints([0, 2, 3])], attrs={"keepdims": 0}, into=grad_b)


def _input_gradient(emit: Emitter, grad_y, w, x_shape, geo: dict, grad_x: gs.Variable) -> None:
    covered = [
        (geo["out"][a] - 1) * geo["strides"][a]
        + (geo["kernel"][a] - 1) * geo["dilations"][a]
        + 1
        - geo["pads"][a]
        - geo["pads"][a + 2]
        for a in range(2)
    ]
    output_padding = [x_shape[2 + a] - covered[a] for a in range(2)]
    attrs = {
        "kernel_shape": list(geo["kernel"]),
        "strides": list(geo["strides"]),
        "dilations": list(geo["dilations"]),
        "pads": list(geo["pads"]),
        "group": geo["group"],
    }
    if any(output_padding):
        attrs["output_padding"] = output_padding
    emit.op("ConvTranspose", "dx", [grad_y, w], attrs=attrs, into=grad_x)


def _weight_gradient(emit: Emitter, grad_y, x, x_shape, w_shape, geo: dict, grad_w: gs.Variable) -> None:
    n, c, h, wd = x_shape
    m = w_shape[0]
    g = geo["group"]
    ho, wo = geo["out"]
    kh, kw = geo["kernel"]
    # X (N, g*Cg, H, W) -> (Cg, g*N, H, W): channel block k of X becomes input group k of the conv.
    x_blocks = emit.reshape("x_blocks", x, [n, g, c // g, h, wd])
    x_blocks = emit.op("Transpose", "x_blocks_t", [x_blocks], [c // g, g, n, h, wd], attrs={"perm": [2, 1, 0, 3, 4]})
    x_batched = emit.reshape("x_batched", x_blocks, [c // g, g * n, h, wd])
    # dY (N, M, Ho, Wo) -> (M, N, Ho, Wo): M/g output channels per group, each a kernel over N channels.
    kernel = emit.op("Transpose", "dy_kernel", [grad_y], [m, n, ho, wo], attrs={"perm": [1, 0, 2, 3]})
    correlation = emit.op(
        "Conv",
        "correlation",
        [x_batched, kernel],
        attrs={
            "kernel_shape": [ho, wo],
            "strides": list(geo["dilations"]),
            "dilations": list(geo["strides"]),
            "pads": list(geo["pads"]),
            "group": g,
        },
    )
    taps = emit.op("Slice", "taps", [correlation, emit.ints([0, 0]), emit.ints([kh, kw]), emit.ints([2, 3])])
    emit.op("Transpose", "dw", [taps], attrs={"perm": [1, 0, 2, 3]}, into=grad_w)


def _pointwise_weight_gradient(emit: Emitter, grad_y, x, x_shape, w_shape, geo: dict, grad_w: gs.Variable) -> None:
    n, c = x_shape[:2]
    m = w_shape[0]
    ho, wo = geo["out"]
    sh, sw = geo["strides"]
    if (sh, sw) != (1, 1):
        ends = [(ho - 1) * sh + 1, (wo - 1) * sw + 1]
        x = emit.op(
            "Slice", "x_strided", [x, emit.ints([0, 0]), emit.ints(ends), emit.ints([2, 3]), emit.ints([sh, sw])]
        )
    pixels = ho * wo
    grad_rows = emit.reshape("dy_rows", grad_y, [n, m, pixels])
    x_rows = emit.reshape("x_rows", x, [n, c, pixels])
    x_columns = emit.op("Transpose", "x_columns", [x_rows], [n, pixels, c], attrs={"perm": [0, 2, 1]})
    per_sample = emit.op("MatMul", "dw_per_sample", [grad_rows, x_columns], [n, m, c])
    if n > 1:
        per_sample = emit.sum_leading("dw_sum", per_sample, n, [m, c])
    emit.reshape("dw", per_sample, list(w_shape), into=grad_w)
