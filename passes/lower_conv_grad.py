"""Lower com.microsoft `ConvGrad(dY, X, W) -> (dX, dW, dB)` to standard ONNX ops.

Contract: every ConvGrad node is replaced; its output tensors keep their names and readers.
The forward conv's geometry (kernel k, stride s, pads, dilation d, group g) is on the node.

- dX is the transposed conv of dY with the same W, strides, pads, dilations and groups; its
  `output_padding` restores the rows and columns the forward's floor division dropped.
- dW[m, c, i, j] = sum_{n, y, x} dY[n, m, y, x] * Xpad[n, c, y*s + i*d, x*s + j*d]: for each of the
  k_h*k_w taps, one GEMM of dY (M x N*Ho*Wo) with the strided window of padded X that the tap reads
  (C x N*Ho*Wo), per group (a 1x1 conv is one tap). Depthwise convs use the textbook form: a Conv
  of X (channels as batch) with dY as an (Ho x Wo) kernel, the C channels as C groups, cut to k x k.
  Measured in ORT 1.19 at batch 32 (2 loaded cores), relative to ORT's ConvGrad: the textbook form
  took 3x for a dense 3x3 conv and 10x for 1x1 convs, the tap GEMMs 1.2x and 1.0-1.4x, a
  per-sample MatMul for 1x1 1.5-1.9x. Depthwise stays at 4-6x: ConvGrad's im2col per (image,
  channel) stays in cache, while whole-tensor ops stream every shifted copy of X through memory.
  Measured on ORT 1.19 and 1.32 (one thread, CPU time, batch 8, C = 32-576, 14-112 px) against
  this textbook form: per-tap products as batched (1 x K)(K x 1) MatMuls 1.9x, per-tap Mul +
  last-axis ReduceSum 1.3x, an im2col by a Conv with one-hot 3x3 kernels plus a batched MatMul
  1.35x, one grouped Conv per (image, channel) 1.0x, three row-shifted copies of each operand in
  one batched (3 x K)(K x 3) MatMul 0.85-1.1x: none kept.
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
        if geo["group"] == x_shape[1] == w_shape[0]:  # depthwise
            _correlation_weight_gradient(emit, grad_y, x, x_shape, w_shape, geo, grad_w)
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
    """dW one kernel tap at a time: tap (i, j) is the product of dY with the strided window of the
    padded X that the tap reads, summed over batch and pixels, i.e. one GEMM over N*Ho*Wo."""
    n, c, h, wd = x_shape
    m = w_shape[0]
    g = geo["group"]
    ho, wo = geo["out"]
    kh, kw = geo["kernel"]
    (sh, sw), (dh, dw), pads = geo["strides"], geo["dilations"], geo["pads"]
    samples = n * ho * wo
    # Channels first, samples last: every tap below is a plain (g, rows, N*Ho*Wo) matrix.
    x_t = emit.op("Transpose", "x_t", [x], [c, n, h, wd], attrs={"perm": [1, 0, 2, 3]})
    if any(pads):
        onnx_pads = [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]
        x_t = emit.op(
            "Pad", "x_pad", [x_t, emit.ints(onnx_pads)], [c, n, h + pads[0] + pads[2], wd + pads[1] + pads[3]]
        )
    padded = [h + pads[0] + pads[2], wd + pads[1] + pads[3]]
    grad_t = emit.op("Transpose", "dy_t", [grad_y], [m, n, ho, wo], attrs={"perm": [1, 0, 2, 3]})
    grad_rows = emit.reshape("dy_rows", grad_t, [g, m // g, samples])
    taps = []
    for i in range(kh):
        for j in range(kw):
            tap = f"tap{i}_{j}"
            starts, ends = [i * dh, j * dw], [i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1]
            window = x_t
            if (starts, ends, sh, sw) != ([0, 0], padded, 1, 1):  # else the tap reads all of X (1x1, stride 1)
                window = emit.op(
                    "Slice",
                    f"{tap}_x",
                    [x_t, emit.ints(starts), emit.ints(ends), emit.ints([2, 3]), emit.ints([sh, sw])],
                    [c, n, ho, wo],
                )
            rows = emit.reshape(f"{tap}_rows", window, [g, c // g, samples])
            columns = emit.op("Transpose", f"{tap}_cols", [rows], [g, samples, c // g], attrs={"perm": [0, 2, 1]})
            product = emit.op("MatMul", f"{tap}_mm", [grad_rows, columns], [g, m // g, c // g])
            taps.append(emit.reshape(tap, product, [1, m, c // g]))
    if len(taps) == 1:
        emit.reshape("dw", taps[0], list(w_shape), into=grad_w)
        return
    # Stacked tap-major, then one Transpose: a Concat along a last axis of size 1 copies element by
    # element (ORT profile, C = 512: the Concat took a fifth of the dW kernels' time).
    stacked = emit.op("Concat", "taps", taps, [kh * kw, m, c // g], attrs={"axis": 0})
    tap_last = emit.op("Transpose", "taps_t", [stacked], [m, c // g, kh * kw], attrs={"perm": [1, 2, 0]})
    emit.reshape("dw", tap_last, list(w_shape), into=grad_w)


def _correlation_weight_gradient(emit: Emitter, grad_y, x, x_shape, w_shape, geo: dict, grad_w: gs.Variable) -> None:
    """dW as a grouped Conv of X (channels as batch) with dY as an (Ho x Wo) kernel, cut to k x k."""
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
