"""Gradient filtering (Yang, Li, Marculescu, CVPR 2023) as a training-graph rewrite.

For every conv in `plan.filtered` (conv node name -> patch size r) the `ConvGrad` node
that ORT's gradient builder emitted is replaced by cheap standard ops that write the
same output tensors. Per axis (h shown; w is the same):

    p_h  = ceil(H_y / r)                 patches of the output gradient
    R_h  = r * s_h                       input rows covered by one patch
    px_h = ceil((p_h * R_h - H_x) / 2)   top pad of x (negative: crop)
    pg_h = ceil((p_h * r   - H_y) / 2)   top pad of g_y (0 <= pg_h < r)

    forward   x~ = SUM-pool of x over R x R windows      N x C_in  x p_h x p_w
              W~ = sum of W over its taps               C_out x C_in/g
    backward  g^ = MEAN-pool of g_y over r x r windows (in-image elements only)
              grad_x = crop(upsample_R(W~^T g^)) / (s_h s_w)
              grad_W[co, ci, :, :] = sum_{n,patches} g^[n, co] x~[n, ci] / (s_h s_w)
              grad_b = sum_{n,h,w} g_y

Dilated axes with d > 1 and d >= r keep their taps apart at patch resolution: there
g^x is the data gradient (ConvTranspose) of a conv with W, dilation d // r and 'same'
padding, instead of the W~ channel mix. `plan.paper_stride_scaling` drops 1/(s_h s_w).

The dilated form drops taps that shift by a whole grid or more (they only read zeros).

Why these ops (ORT 1.19 CPU, 2 threads, batch 32, the paper's 3x3 layer shapes): ORT
runs ~20 small ops with a fixed cost each, so the op count and a few slow ORT kernels
(Expand into the last axes, a Transpose moving 9-float runs, ReduceSum over a
middle axis of a short row or over a leading axis) decided the small layers, not the
FLOPs. Hence:
- pooling: ONE MatMul with a 0/1 (or 1/count) matrix reads g_y once when each element
  feeds few outputs (r whole rows -> p_w windows, or the whole map -> every window; "few"
  is wider for r <= 2); wider maps sum the r rows of each window first (ReduceSum over a
  middle axis of whole rows), then the column blocks of that r times smaller tensor with
  a 0/1 MatMul;
- grad_W and the channel mix: with few patches, g^ and x~ are transposed to
  channel-major (small tensors) so each is ONE GEMM over batch x patches; with many,
  per-sample batched GEMMs, the FusedMatMul alpha carrying the scale, summed over
  samples by a MatMul with a row of ones (`Emitter.sum_leading`);
- W~: the taps are summed first (a GEMV whose vector carries the scale), then the small
  C_out x C_in/g matrix is transposed;
- grad_b: g^ summed over samples, then a GEMV with per-patch weights (ones for sums,
  window counts for means), never another pass over g_y; grad_W's taps: a K=1 MatMul
  of the per-tap values with a row of ones;
- upsample: a 0/1 MatMul for the columns, then one Gather over rows that also does the
  crop and the zero fill (Expand and Resize measured 1.5-4x slower).
The constant factors (1/r^2 of an aligned mean, R^2 of an AveragePool-based sum,
1/(s_h s_w)) are folded into W~ or a GEMM's alpha, so no extra pass over a big tensor runs.
See benchmarks/layers.py and the README for the measured speed-ups.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from .base import ConvLayer, Plan, Stage, pass_logger
from .emitter import MS_DOMAIN, Emitter, redirect
from .geometry import FilterGeometry, explicit_pads, filter_geometry, g_pool_holds_sums, tap_plan
from .names import G_POOL, GX_HAT, UPSAMPLE, X_POOL, NameAllocator, in_scope, preferred_filter_scope, scoped

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ("static_shapes", "ort_gradient_graph")

_LOG = pass_logger(__name__)


def pooled_input_name(conv: str) -> str:
    """The name x~ (N x C_in x p_h x p_w) of `conv` gets when nothing in the graph collides with it.

    Passes ask `plan.generated.filter_tensor(conv, X_POOL)`, which is right in every graph;
    this is for looking into compiled artifacts of known models.
    """
    return scoped(preferred_filter_scope(conv), X_POOL)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Replace the ConvGrad of every filtered conv with the gradient-filtering ops."""
    if plan.filtered and graph.opset < 13:
        # ReduceSum/Slice/Pad with tensor axes/pads are opset-13 forms.
        raise ValueError(f"gradient filter needs opset >= 13, the training graph has {graph.opset}")
    names = NameAllocator(graph)
    for conv_name, r in plan.filtered.items():
        try:
            layer = plan.conv(conv_name)
        except KeyError:
            raise ValueError(f"gradient filter: conv {conv_name!r} is filtered but not in the plan") from None
        forward = _forward_conv(graph, layer)
        layer = _resolve_auto_pad(layer, forward)
        geom = filter_geometry(layer, r)
        conv_grad = _conv_grad(graph, layer)
        em = Emitter(graph, names, preferred_filter_scope(layer.node))
        _rewrite(em, layer, geom, conv_grad, plan.paper_stride_scaling)
        plan.generated.filter_scopes[conv_name] = em.scope
        _LOG.info("%s with r=%d under %s/", conv_name, r, em.scope)
    graph.cleanup().toposort()
    for conv_name, readers in retained_input_readers(graph, plan).items():
        # Not ours to change (e.g. ReluGrad reads the ReLU output that is x), but it decides
        # whether the full-resolution x is still saved, so say so.
        _LOG.info("input of %s is still read by %s", conv_name, ", ".join(readers))
    return graph


def retained_input_readers(graph: gs.Graph, plan: Plan) -> dict[str, list[str]]:
    """Per filtered conv, "name (op)" of every node besides the conv and its own pooling that reads x.

    After `run` these are other forward consumers of x (a residual Add, sibling ASPP
    branches) and the gradient nodes of other layers (a ReluGrad reading the ReLU output
    that is x, an unfiltered sibling's ConvGrad). The latter keep the full-resolution
    activation alive into the backward, which the memory table should know about.
    """
    tensors = graph.tensors()
    readers: dict[str, list[str]] = {}
    for conv_name in plan.filtered:
        layer = plan.conv(conv_name)
        x = tensors.get(layer.input)
        if x is None:
            continue
        scope = plan.generated.filter_scopes.get(conv_name)
        others = [
            f"{n.name} ({n.op})"
            for n in x.outputs
            if n.name != layer.node and not (scope is not None and in_scope(scope, n.name))
        ]
        if others:
            readers[conv_name] = others
    return readers


def _forward_conv(graph: gs.Graph, layer: ConvLayer) -> gs.Node:
    matches = [n for n in graph.nodes if n.op == "Conv" and n.name == layer.node]
    if not matches:
        # ORT keeps forward node names; fall back to the (input, weight) pair anyway.
        matches = [
            n
            for n in graph.nodes
            if n.op == "Conv"
            and len(n.inputs) > 1
            and (n.inputs[0].name, n.inputs[1].name) == (layer.input, layer.weight)
        ]
    if len(matches) != 1:
        raise ValueError(f"gradient filter: found {len(matches)} forward Conv nodes for conv {layer.node!r}, need 1")
    return matches[0]


def _resolve_auto_pad(layer: ConvLayer, node: gs.Node) -> ConvLayer:
    """Explicit pads from the node's auto_pad (if any), so the shape check sees real pads."""
    try:
        pads = explicit_pads(
            node.attrs.get("auto_pad"), layer.pads, layer.x_shape[2:], layer.kernel, layer.strides, layer.dilations
        )
    except ValueError as exc:
        raise ValueError(f"gradient filter on conv {layer.node!r}: {exc}") from None
    return replace(layer, pads=pads)


def _conv_grad(graph: gs.Graph, layer: ConvLayer) -> gs.Node:
    matches = [
        n
        for n in graph.nodes
        if n.op == "ConvGrad"
        and len(n.inputs) >= 3
        and n.inputs[1].name == layer.input
        and n.inputs[2].name == layer.weight
    ]
    if len(matches) != 1:
        raise ValueError(
            f"gradient filter on conv {layer.node!r}: expected one ConvGrad reading ({layer.input!r}, "
            f"{layer.weight!r}), found {len(matches)}; is the conv trainable and not yet filtered?"
        )
    node = matches[0]
    where = f"gradient filter on conv {layer.node!r}"
    checks = {
        "group": (int(node.attrs.get("group", 1)), layer.group),
        "strides": (tuple(node.attrs.get("strides", (1, 1))), layer.strides),
        "dilations": (tuple(node.attrs.get("dilations", (1, 1))), layer.dilations),
    }
    for attr, (found, planned) in checks.items():
        if found != planned:
            raise ValueError(f"{where}: ConvGrad has {attr}={found}, the plan says {planned}")
    g_y, x, w = node.inputs[:3]
    c_out = layer.y_shape[1]
    expected = (
        (g_y, layer.y_shape),
        (x, layer.x_shape),
        (w, (c_out, layer.x_shape[1] // layer.group, *layer.kernel)),
    )
    for tensor, shape in expected:
        if tensor.shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {tensor.name!r} has shape {tensor.shape}, the plan says {shape}")
        if tensor.dtype is not None and np.dtype(tensor.dtype) != np.float32:
            raise ValueError(f"{where}: only float32 is supported, {tensor.name!r} is {tensor.dtype}")
    return node


# One MatMul pools a tensor in a single pass when each element feeds at most this many
# outputs (2 FLOPs each); the two-stage block sum / AveragePool win beyond it (measured
# at 14x14..120x160 with windows of 3+ rows: a win up to p_w = 20, a tie at 28 (r=4,
# 32x112x112), a loss from 40 on (r=4, 128x120x160: 0.74x of the two-stage sum)).
_ONE_PASS_MAX_OUTPUTS = 24
# With windows of at most 2 rows the two-stage sum's column MatMul still reads half of the
# input, so the one MatMul wins up to wider rows: CPU time at batch 32, 2 threads, measured
# interleaved: 1.9x at p_w = 28 (64x56x56), 1.5x at 40 (256x60x80), 1.2x at 56
# (32x112x112), 0.7x at 80 (128x120x160).
_ONE_PASS_MAX_OUTPUTS_TWO_ROWS = 64


# Unaligned g_y with too many windows for one MatMul: a column MatMul (2 * p_w FLOPs per
# element) then a row-window MatMul over the planes beats AveragePool(count_include_pad=0)
# up to this p_w (CPU time at batch 32: 1.5x at 512x30x40 r=4, 1.4x at 128x28x28 r=3,
# 0.9x at 64x56x56 r=3 with p_w = 19).
_SEPARABLE_MAX_OUTPUTS = 16


def _one_pass(outputs: int, rows: int) -> bool:
    """Pool with one 0/1 MatMul (2 * `outputs` FLOPs per element) rather than in two stages."""
    return outputs <= (_ONE_PASS_MAX_OUTPUTS_TWO_ROWS if rows <= 2 else _ONE_PASS_MAX_OUTPUTS)


def _block_width(count: int) -> int:
    """How many outputs one row of the 0/1 pooling/upsampling MatMul produces.

    MLAS is fastest with 8-16 output columns; the row must hold whole windows, so take
    the largest divisor of `count` up to 16 (whole rows when only tiny divisors exist).
    """
    best = max(d for d in range(1, min(count, 16) + 1) if count % d == 0)
    return count if best < 4 and count <= 48 else best


def _block_sum(em: Emitter, name: str, src: gs.Tensor, shape: tuple[int, ...], b_h: int, b_w: int) -> gs.Variable:
    """Sum over non-overlapping b_h x b_w blocks of an N x C x H x W tensor (H, W divisible)."""
    n, c, h, w = shape
    p_h, p_w = h // b_h, w // b_w
    if b_h == 1 and b_w == 1:
        return em.op("Identity", name, [src], shape)
    if _one_pass(p_w, b_h):
        # b_h whole rows are contiguous: (N*C*p_h, b_h*W) @ (b_h*W, p_w) reads src once.
        window = np.kron(np.eye(p_w, dtype=np.float32), np.ones((b_w, 1), dtype=np.float32))
        flat = em.reshape(f"{name}_rows", src, (n * c * p_h, b_h * w))
        matrix = em.const(f"{name}_matrix", np.tile(window, (b_h, 1)))
        return em.reshape(name, em.op("MatMul", f"{name}_mm", [flat, matrix], (n * c * p_h, p_w)), (n, c, p_h, p_w))
    cur: gs.Tensor = src
    # Rows first (ReduceSum over the middle axis of (N*C*p_h, b_h, W): ORT's KRK path,
    # vectorised over a whole row, about one pass over src), then the column blocks with a
    # 0/1 MatMul on the b_h times smaller result. The other order ran the MatMul over all of
    # src and the ReduceSum over rows only p_w long; CPU time of this order at batch 32,
    # 2 threads, interleaved: 1.17x faster at 128x120x160 r=4, 1.15x at r=2, 1.19x at
    # 256x60x80 r=4, 0.93x at 32x112x112 r=2 (where the one MatMul is taken anyway).
    # AveragePool and a depthwise ones-kernel Conv measured 0.6-1.05x of the old order at
    # these wide maps, a 6-D ReduceSum over axes (2, 4) 0.9-1.1x.
    if b_h > 1:
        rows = em.reshape(f"{name}_rows", cur, (n * c * p_h, b_h, w))
        cur = em.reduce_sum(f"{name}_hsum", rows, (1,), (n * c * p_h, w))
    if b_w > 1:
        m = _block_width(p_w)
        blocks = em.reshape(f"{name}_cols", cur, (n * c * p_h * p_w // m, m * b_w))
        ones = np.kron(np.eye(m, dtype=np.float32), np.ones((b_w, 1), dtype=np.float32))
        matrix = em.const(f"{name}_wsum_matrix", ones)
        cur = em.op("MatMul", f"{name}_wsum", [blocks, matrix], (n * c * p_h * p_w // m, m))
    return em.reshape(name, cur, (n, c, p_h, p_w))


def _pool_input(em: Emitter, x: gs.Tensor, layer: ConvLayer, geom: FilterGeometry) -> tuple[gs.Variable, float]:
    """x~ (N x C_in x p_h x p_w) and the factor that turns it into the window SUM."""
    n, c, h, w = layer.x_shape
    p_h, p_w = geom.grid
    R_h, R_w = geom.patch
    pooled = geom.x_pooled_shape
    if geom.x_aligned:
        return _block_sum(em, X_POOL, x, layer.x_shape, R_h, R_w), 1.0
    top, left, bottom, right = geom.x_pads
    cur: gs.Tensor = x
    if min(geom.x_pads) < 0:
        # Negative pads crop: only rows [-top, -top + p_h*R_h) take part (valid convs).
        starts = (max(-top, 0), max(-left, 0))
        ends = (h - max(-bottom, 0), w - max(-right, 0))
        h, w = ends[0] - starts[0], ends[1] - starts[1]
        cur = em.op(
            "Slice",
            "x_crop",
            [cur, em.ints(starts, "x_crop_starts"), em.ints(ends, "x_crop_ends"), em.ints((2, 3), "x_crop_axes")],
            (n, c, h, w),
        )
    pads = tuple(max(p, 0) for p in geom.x_pads)
    if pads == (0, 0, 0, 0):
        return _block_sum(em, X_POOL, cur, (n, c, h, w), R_h, R_w), 1.0
    if max(pads[0], pads[2]) < R_h and max(pads[1], pads[3]) < R_w:
        # One op: zero padding adds nothing, count_include_pad=1 divides by exactly R_h*R_w.
        attrs = {"kernel_shape": [R_h, R_w], "strides": [R_h, R_w], "pads": list(pads), "count_include_pad": 1}
        return em.op("AveragePool", X_POOL, [cur], pooled, attrs=attrs), float(R_h * R_w)
    # Pads of a whole window or more (unusual conv pads): pad explicitly, then block-sum.
    padded = em.op(
        "Pad",
        "x_padded",
        [cur, em.ints((0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]), "x_padded_pads")],
        (n, c, p_h * R_h, p_w * R_w),
    )
    return _block_sum(em, X_POOL, padded, (n, c, p_h * R_h, p_w * R_w), R_h, R_w), 1.0


def _window_matrix(size: int, r: int, begin: int, count: int) -> np.ndarray:
    """size x count 0/1 matrix: column j marks the in-image elements of window j (pad `begin`)."""
    starts = np.arange(count) * r - begin
    index = np.arange(size)[:, None]
    return ((index >= starts) & (index < starts + r)).astype(np.float64)


def _pool_grad(
    em: Emitter, g_y: gs.Tensor, layer: ConvLayer, geom: FilterGeometry
) -> tuple[gs.Tensor, float, np.ndarray]:
    """g^ as (tensor, factor to the MEAN, per-patch weights whose dot with g^ is the window sum).

    Aligned windows give exact block SUMS (the 1/r^2 folds into small tensors later);
    the others give exact MEANS over in-image elements, which is what the method defines.
    """
    r = geom.r
    n, c, h, w = layer.y_shape
    p_h, p_w = geom.grid
    rows = _window_matrix(h, r, geom.g_pads[0], p_h)
    cols = _window_matrix(w, r, geom.g_pads[1], p_w)
    counts = np.outer(rows.sum(axis=0), cols.sum(axis=0)).reshape(-1)
    if r == 1:
        return g_y, 1.0, counts
    if g_pool_holds_sums(geom):
        return _block_sum(em, G_POOL, g_y, layer.y_shape, r, r), 1.0 / (r * r), np.ones_like(counts)
    # Dividing the 0/1 windows by their counts makes the MatMul forms below exact means.
    rows, cols = rows / rows.sum(axis=0), cols / cols.sum(axis=0)
    to_mean, weights = 1.0, counts
    rows_whole = geom.g_pads[0] == 0 and geom.g_pads[2] == 0
    if rows_whole and _one_pass(p_w, r):
        # r whole rows are contiguous: (N*C*p_h, r*W) @ (r*W, p_w) reads g_y once.
        matrix = np.tile(cols, (r, 1)) / r
        flat = em.reshape(f"{G_POOL}_rows", g_y, (n * c * p_h, r * w))
        pooled = em.op(
            "MatMul",
            f"{G_POOL}_mm",
            [flat, em.const(f"{G_POOL}_matrix", matrix.astype(np.float32))],
            (n * c * p_h, p_w),
        )
        return em.reshape(G_POOL, pooled, geom.g_pooled_shape), to_mean, weights
    if p_h * p_w <= _ONE_PASS_MAX_OUTPUTS:
        # Every window at once (any pads): (N*C, H*W) @ kron(rows, cols).
        matrix = np.kron(rows, cols)
        flat = em.reshape(f"{G_POOL}_rows", g_y, (n * c, h * w))
        pooled = em.op(
            "MatMul",
            f"{G_POOL}_mm",
            [flat, em.const(f"{G_POOL}_matrix", matrix.astype(np.float32))],
            (n * c, p_h * p_w),
        )
        return em.reshape(G_POOL, pooled, geom.g_pooled_shape), to_mean, weights
    if p_w <= _SEPARABLE_MAX_OUTPUTS:
        # Columns then rows, each a MatMul with its 1/count window matrix (the mean is
        # separable): the first reads g_y once, the second only the r times smaller result.
        cols_sum = em.op(
            "MatMul",
            f"{G_POOL}_sep_cols",
            [
                em.reshape(f"{G_POOL}_sep_in", g_y, (n * c * h, w)),
                em.const(f"{G_POOL}_sep_cols_matrix", cols.astype(np.float32)),
            ],
            (n * c * h, p_w),
        )
        planes = em.reshape(f"{G_POOL}_sep_planes", cols_sum, (n * c, h, p_w))
        # A 2-D left operand broadcasts over the N*C planes: (p_h, H) @ (N*C, H, p_w).
        row_windows = em.const(f"{G_POOL}_sep_rows_matrix", np.ascontiguousarray(rows.T).astype(np.float32))
        pooled = em.op("MatMul", f"{G_POOL}_sep_rows", [row_windows, planes], (n * c, p_h, p_w))
        return em.reshape(G_POOL, pooled, geom.g_pooled_shape), to_mean, weights
    # Border windows are partly outside the image: count_include_pad=0 divides by the
    # in-image count, which is the exact mean the method defines.
    attrs = {"kernel_shape": [r, r], "strides": [r, r], "pads": list(geom.g_pads), "count_include_pad": 0}
    return em.op("AveragePool", G_POOL, [g_y], geom.g_pooled_shape, attrs=attrs), to_mean, weights


def _window(em: Emitter, name: str, src: gs.Tensor, shape: tuple[int, ...], axis: int, start: int, length: int):
    """src[start : start + length] on `axis`, zero-filled outside src (Slice or Pad)."""
    size = shape[axis]
    if start == 0 and length == size:
        return src, shape
    out_shape = tuple(length if i == axis else d for i, d in enumerate(shape))
    if start >= 0 and start + length <= size:
        inputs = [src, em.ints((start,), f"{name}_starts"), em.ints((start + length,), f"{name}_ends")]
        return em.op("Slice", name, [*inputs, em.ints((axis,), f"{name}_axes")], out_shape), out_shape
    if start <= 0 and start + length >= size:
        pads = [0] * 8
        pads[axis], pads[4 + axis] = -start, start + length - size
        return em.op("Pad", name, [src, em.ints(pads, f"{name}_pads")], out_shape), out_shape
    raise AssertionError(f"window [{start}, {start + length}) of size {size} both pads and crops")


def _upsample(em: Emitter, src: gs.Tensor, layer: ConvLayer, geom: FilterGeometry) -> gs.Tensor:
    """Nearest-upsample N x C_in x p_h x p_w into R x R blocks, cropped/zero-filled to H_x x W_x."""
    n, c, h_x, w_x = layer.x_shape
    p_h, p_w = geom.grid
    R_h, R_w = geom.patch
    top, left = geom.x_pads[:2]
    cur: gs.Tensor = src
    shape = (n, c, p_h, p_w)
    if R_w > 1:
        m = _block_width(p_w)
        rows = em.reshape(f"{UPSAMPLE}_rows", cur, (n * c * p_h * p_w // m, m))
        copy = np.kron(np.eye(m, dtype=np.float32), np.ones((1, R_w), dtype=np.float32))
        wide = em.op(
            "MatMul",
            f"{UPSAMPLE}_cols",
            [rows, em.const(f"{UPSAMPLE}_cols_matrix", copy)],
            (n * c * p_h * p_w // m, m * R_w),
        )
        shape = (n, c, p_h, p_w * R_w)
        cur = em.reshape(f"{UPSAMPLE}_w", wide, shape)
    cur, shape = _window(em, f"{UPSAMPLE}_w_window", cur, shape, 3, left, w_x)
    # Rows: one Gather does the R_h-fold repeat, the crop and (via an appended zero row)
    # the zero fill of rows that a cropping (negative) pad leaves uncovered.
    src_rows = [(i + top) // R_h if 0 <= i + top < p_h * R_h else p_h for i in range(h_x)]
    if src_rows == list(range(p_h)) and h_x == p_h:
        return cur if cur is not src else em.op("Identity", UPSAMPLE, [cur], shape)
    if p_h in src_rows:
        cur, shape = _window(em, f"{UPSAMPLE}_zero_row", cur, shape, 2, 0, p_h + 1)
    indices = em.ints(src_rows, f"{UPSAMPLE}_rows_index")
    return em.op("Gather", UPSAMPLE, [cur, indices], (n, c, h_x, w_x), attrs={"axis": 2})


# Up to this many patches per sample, g^ and x~ are transposed to channel-major (small
# tensors) so that grad_W and the channel mix are each ONE GEMM over (batch x patches);
# above it the per-sample batched GEMMs are already large and those transposes cost more
# (measured: 0.3-0.65x at 16-49 patches, 1.2x at 196, 1.5-2.5x at 1200-4800).
_ONE_GEMM_MAX_PATCHES = 64


def _rewrite(em: Emitter, layer: ConvLayer, geom: FilterGeometry, conv_grad: gs.Node, paper: bool) -> None:
    g_y, x, w = conv_grad.inputs[:3]
    outputs = list(conv_grad.outputs) + [None] * (3 - len(conv_grad.outputs))
    # ORT writes '' for gradients nobody needs (e.g. dX of the first trainable conv).
    d_x, d_w, d_b = (t if t is not None and t.name else None for t in outputs[:3])
    conv_grad.inputs.clear()
    conv_grad.outputs.clear()

    n, c_in, _, _ = layer.x_shape
    c_out = layer.y_shape[1]
    group = layer.group
    cin_g, cout_g = c_in // group, c_out // group
    k_h, k_w = layer.kernel
    p_h, p_w = geom.grid
    patches = p_h * p_w
    stride_div = 1.0 if paper else float(geom.strides[0] * geom.strides[1])

    g_hat, to_mean, bias_weights = _pool_grad(em, g_y, layer, geom)
    # Channel-major g^ (group, C_out/g, N*P), shared by grad_W and the channel mix.
    one_gemm = cin_g > 1 and patches <= _ONE_GEMM_MAX_PATCHES
    g_major = _channel_major(em, "g_major", g_hat, (n, group, cout_g, patches)) if one_gemm else None

    if d_b is not None:
        # Exact: sum over pixels == per-patch weights (ones for window sums, in-image
        # counts for means) dotted with g^, at patch resolution instead of a pass over g_y.
        # Samples first: the GEMV then reads an N times smaller tensor.
        per_patch = em.sum_leading("bias_samples", g_hat, n, (c_out, patches))
        weights = em.const("bias_weights", bias_weights.reshape(patches, 1).astype(np.float32))
        per_channel = em.op("MatMul", "bias_patches", [per_patch, weights], (c_out, 1))
        redirect(em.reshape("bias_sum", per_channel, (c_out,)), d_b)

    if d_w is not None:
        x_tilde, to_sum = _pool_input(em, x, layer, geom)
        alpha = to_sum * to_mean / stride_div
        if cin_g == 1:
            # Depthwise-like: each output channel meets one input channel; a matmul per
            # (n, group) would be a 1 x P x 1 GEMM, so multiply and reduce instead.
            gq = em.reshape("gw_g", g_hat, (n, group, cout_g, patches))
            xq = em.reshape("gw_x", x_tilde, (n, group, 1, patches))
            prod = em.op("Mul", "gw_prod", [gq, xq], (n, group, cout_g, patches))
            per_patch = em.sum_leading("gw_samples", prod, n, (group, cout_g, patches))
            per_tap = em.reduce_sum("gw_sum", per_patch, (2,), (group, cout_g))
            per_tap = em.scale("gw_scaled", per_tap, alpha, (group, cout_g))
        elif g_major is not None:
            x_major = _channel_major(em, "x_major", x_tilde, (n, group, cin_g, patches))
            attrs = {"transA": 0, "transB": 1, "alpha": float(alpha)}
            per_tap = em.op(
                "FusedMatMul", "gw_prod", [g_major, x_major], (group, cout_g, cin_g), attrs=attrs, domain=MS_DOMAIN
            )
        else:
            gq = em.reshape("gw_g", g_hat, (n, group, cout_g, patches))
            xq = em.reshape("gw_x", x_tilde, (n, group, cin_g, patches))
            # g^ x~^T per sample with the scale folded into alpha, then summed over samples.
            attrs = {"transA": 0, "transB": 1, "alpha": float(alpha)}
            prod = em.op("FusedMatMul", "gw_prod", [gq, xq], (n, group, cout_g, cin_g), attrs=attrs, domain=MS_DOMAIN)
            per_tap = em.sum_leading("gw_sum", prod, n, (group, cout_g, cin_g))
        if (k_h, k_w) == (1, 1):
            redirect(em.reshape("gw_taps", per_tap, (c_out, cin_g, 1, 1)), d_w)
        else:
            # The same value on every tap: a K=1 MatMul with a row of ones writes the rows of
            # taps with MLAS's threaded GEMM, 2.1x faster than a broadcast Mul with ones and
            # 4.5x faster than Expand or Tile (9.4 MB of dW at C=512, 2 threads).
            column = em.reshape("gw_taps", per_tap, (c_out * cin_g, 1))
            ones = em.const("gw_full_ones", np.ones((1, k_h * k_w), dtype=np.float32))
            rows = em.op("MatMul", "gw_full_rows", [column, ones], (c_out * cin_g, k_h * k_w))
            redirect(em.reshape("gw_full", rows, (c_out, cin_g, k_h, k_w)), d_w)

    if d_x is not None:
        factor = to_mean / stride_div
        if geom.spatial:
            g_hat_x = _spatial_input_grad(em, g_hat, w, layer, geom, factor)
        else:
            g_hat_x = _mixed_input_grad(em, g_hat, g_major, w, layer, geom, factor)
        redirect(_upsample(em, g_hat_x, layer, geom), d_x)


def _channel_major(em: Emitter, name: str, src: gs.Tensor, shape: tuple[int, int, int, int]) -> gs.Variable:
    """(N, G, C/G, P) view of `src` transposed to (G, C/G, N*P): one GEMM then contracts N and P together."""
    n, group, per_group, patches = shape
    grouped = em.reshape(f"{name}_in", src, shape)
    moved = em.op("Transpose", name, [grouped], (group, per_group, n, patches), attrs={"perm": [1, 2, 0, 3]})
    return em.reshape(f"{name}_flat", moved, (group, per_group, n * patches))


def _mixed_input_grad(
    em: Emitter,
    g_hat: gs.Tensor,
    g_major: gs.Tensor | None,
    w: gs.Tensor,
    layer: ConvLayer,
    geom: FilterGeometry,
    factor: float,
) -> gs.Tensor:
    """W~^T g^ per patch (block-diagonal for groups); N x C_in x p_h x p_w."""
    n, c_in, _, _ = layer.x_shape
    c_out, group = layer.y_shape[1], layer.group
    cin_g, cout_g = c_in // group, c_out // group
    p_h, p_w = geom.grid
    patches = p_h * p_w
    out4 = (n, c_in, p_h, p_w)
    # W~ lives on the weight only (tiny); the 1/r^2 of a sum-pool and 1/(s_h s_w) fold in here.
    if cin_g == 1 and cout_g == 1:
        w_sum = em.reduce_sum("w_sum", w, (1, 2, 3), (c_out,))
        w_sum = em.scale("w_sum_scaled", w_sum, factor, (c_out,))
        w_col = em.reshape("w_sum_col", w_sum, (c_out, 1, 1))
        return em.op("Mul", "gx_mix", [g_hat, w_col], out4)
    # Sum the taps before transposing: a transpose that moves 9-float runs of the full
    # kernel cost as much as the GEMM at C=512. The scale rides on the tap-sum GEMV.
    taps = layer.kernel[0] * layer.kernel[1]
    w_taps = em.reshape("w_taps", w, (group * cout_g * cin_g, taps))
    tap_sum = em.const("w_tap_sum", np.full((taps, 1), factor, dtype=np.float32))
    w_sum = em.op("MatMul", "w_sum", [w_taps, tap_sum], (group * cout_g * cin_g, 1))
    w_sum = em.reshape("w_sum_3d", w_sum, (group, cout_g, cin_g))
    w_sum_t = em.op("Transpose", "w_sum_t", [w_sum], (group, cin_g, cout_g), attrs={"perm": [0, 2, 1]})
    if g_major is not None:
        # One GEMM over all samples and patches, then back to N x C_in at patch resolution.
        mixed = em.op("MatMul", "gx_mix", [w_sum_t, g_major], (group, cin_g, n * patches))
        mixed = em.reshape("gx_mix_4d", mixed, (group, cin_g, n, patches))
        mixed = em.op("Transpose", "gx_mix_t", [mixed], (n, group, cin_g, patches), attrs={"perm": [2, 0, 1, 3]})
        return em.reshape(GX_HAT, mixed, out4)
    # Per-sample GEMMs. ORT would fold the Transpose into them as transA, which MLAS then
    # redoes for every sample (1.3x slower at 128x120x160 r=4, 1.25x at 256x60x80); a
    # Reshape in between keeps W~^T materialised once (the fusion matches only a Transpose
    # that feeds the MatMul directly).
    w_sum_t = em.reshape("w_sum_t_4d", w_sum_t, (1, group, cin_g, cout_g))
    flat = em.reshape("gx_g", g_hat, (n, group, cout_g, patches))
    mixed = em.op("MatMul", "gx_mix", [w_sum_t, flat], (n, group, cin_g, patches))
    return em.reshape(GX_HAT, mixed, out4)


def _spatial_input_grad(
    em: Emitter, g_hat: gs.Tensor, w: gs.Tensor, layer: ConvLayer, geom: FilterGeometry, factor: float
) -> gs.Tensor:
    """Data gradient of a stride-1 conv with W at patch resolution (reduced dilation, 'same' pads)."""
    c_out = layer.y_shape[1]
    cin_g = layer.x_shape[1] // layer.group
    weight: gs.Tensor = w
    # An axis whose taps all land in one patch (reduced dilation 0) is summed, W~-style.
    collapse = tuple(axis for axis, d in zip((2, 3), geom.reduced_dilations, strict=True) if not d)
    kernel = tuple(1 if not d else k for k, d in zip(layer.kernel, geom.reduced_dilations, strict=True))
    if collapse:
        attrs = {"keepdims": 1}
        weight = em.op(
            "ReduceSum", "w_taps", [w, em.ints(collapse, "w_taps_axes")], (c_out, cin_g, *kernel), attrs=attrs
        )
    plans = [
        tap_plan(k, d, grid) if d else (0, 1, 0, 0)
        for k, d, grid in zip(kernel, geom.reduced_dilations, geom.grid, strict=True)
    ]
    kept = tuple(plan[1] for plan in plans)
    if kept != kernel:
        starts = tuple(plan[0] for plan in plans)
        ends = tuple(start + count for start, count in zip(starts, kept, strict=True))
        inputs = [
            weight,
            em.ints(starts, "w_kept_starts"),
            em.ints(ends, "w_kept_ends"),
            em.ints((2, 3), "w_kept_axes"),
        ]
        weight = em.op("Slice", "w_kept", inputs, (c_out, cin_g, *kept))
    weight = em.scale("w_scaled", weight, factor, (c_out, cin_g, *kept))
    attrs = {
        "kernel_shape": list(kept),
        "dilations": [max(d, 1) if count > 1 else 1 for d, count in zip(geom.reduced_dilations, kept, strict=True)],
        "pads": [plans[0][2], plans[1][2], plans[0][3], plans[1][3]],
        "strides": [1, 1],
        "group": layer.group,
    }
    return em.op("ConvTranspose", GX_HAT, [g_hat, weight], geom.x_pooled_shape, attrs=attrs)


__all__ = [
    "FACTS",
    "REQUIRES",
    "STAGE",
    "pooled_input_name",
    "retained_input_readers",
    "run",
]
