"""Fuse the upsample of one filtered conv with the mean-pool of the filtered conv below it.

Conv A (lower) and conv B (upper) are both gradient-filtered, and x_B is y_A passed
through per-channel affine ops only (eval BN is `Mul(y, scale4)` then `Add(., shift4)`).
After `gradient_filter` the backward between them reads, per axis (h shown):

    grad_x_B = crop(upsample_R(a))             a = g^x_B, N x C x p_h x p_w, R = r_B * s_B
    g_y_A    = s * grad_x_B                    ORT's gradients of the affine ops
    g^_A     = pool_r(g_y_A)                   r x r windows, pad pg, MEAN (AveragePool) or SUM

When A's windows are B's blocks (r_A == R_B on both axes, the same patch grid and the
same leading pad), every in-image element of a window holds the same value s * a[j], so
the mean is exactly s * a[j] and the sum r_A^2 * s * a[j] (aligned windows are all full).
A is then fed from `a` at patch resolution and the full-resolution g_y_A, its pool and,
where nothing else reads it, B's upsample are never computed.

Other readers of the full-resolution gradients keep the upsample alive. One of them is
rewritten at patch resolution because it is exact there: a ReduceSum over both spatial
axes (ORT's dbeta of the BN shift: sum_pixels g == sum_blocks count_j * value_j). A's
own bias gradient already reads g^_A (gradient_filter weights it by the window counts).
dgamma (sum g * x^) multiplies by a full-resolution activation and is left alone, so
with a trainable BN the upsample stays for it.

The same identity removes an upsample whose output only feeds channel splits (ORT's
Concat gradient, `SplitTraining`/`Split` on axis 1) whose used outputs are only summed
over space. That is DeepLab's ASPP: the projection conv's input gradient reaches the
trained image-pooling branch only through `Slice` of the concat gradient and the Expand
gradient (a spatial ReduceSum); the other four branches are frozen and their slices are
never read, yet ORT allocated the full-resolution gradient and every split output (at
512², batch 8: 160 MiB plus 160 MiB, which made the filtered step peak above the exact
one). Each used output becomes the block-count-weighted sum of its channels of `a` at
patch resolution, so neither the upsample nor the split is computed.

The pass finds gradient_filter's tensors through the scope gradient_filter published for
each conv (`plan.generated.filter_scopes`): in it, `names.G_POOL` is g^ and the nodes of role
`names.UPSAMPLE` are the upsample chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .base import Plan, Stage, pass_logger
from .emitter import Emitter
from .geometry import FilterGeometry, block_counts, filter_geometry, g_pool_holds_sums
from .names import G_POOL, UPSAMPLE, NameAllocator, in_role, in_scope, scoped

STAGE: Stage = "training"
REQUIRES: tuple[str, ...] = ("gradient_filter",)
FACTS: tuple[str, ...] = ("ort_gradient_graph",)

_LOG = pass_logger(__name__)
# A chain of affine gradient ops longer than this is not an eval BN; stop looking.
_MAX_CHAIN = 32
# ops on the gradient path from grad_x_B to g_y_A that scale each channel by a factor
_PATH_OPS = ("Identity", "Neg", "Mul", "Div")


@dataclass(frozen=True, eq=False)
class _Step:
    """One gradient op on the path: out = op(inp, operand). `operand` is per-channel or None."""

    node: gs.Node
    op: str
    inp: gs.Variable
    out: gs.Variable
    operand: gs.Tensor | None


@dataclass(frozen=True, eq=False)
class Fusion:
    """A pair whose upsample + pool cancels. `path[i]` maps tensor i to i+1 (0: grad_x_B, last: g_y_A)."""

    lower: str
    upper: str
    patch_grad: gs.Variable  # a = g^x_B, N x C x p_h x p_w, what B's upsample reads
    upsampled: gs.Variable  # grad_x_B, the upsample's output
    g_y: gs.Variable  # g_y_A, what A's pool reads
    pooled: gs.Variable  # g^_A, gradient_filter's G_POOL tensor of A
    path: tuple[_Step, ...]
    lower_geometry: FilterGeometry
    upper_geometry: FilterGeometry

    @property
    def pooled_holds_sums(self) -> bool:
        return g_pool_holds_sums(self.lower_geometry)


def run(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Feed every fusable lower conv's g^ straight from the upper conv's patch-resolution gradient."""
    names = NameAllocator(graph)
    for fusion in find_fusions(graph, plan):
        _LOG.info("%s feeds %s at patch resolution", fusion.upper, fusion.lower)
        _fuse(graph, names, plan.generated.filter_scopes[fusion.lower], fusion)
    graph.cleanup()
    for conv_name in plan.filtered:
        _reduce_split_upsample(graph, names, plan, conv_name)
    graph.cleanup().toposort()
    return graph


def find_fusions(graph: gs.Graph, plan: Plan) -> list[Fusion]:
    """Every (A, B) pair of filtered convs whose geometry lines up and whose gradient path is per-channel."""
    scopes = plan.generated.filter_scopes
    upsamples = {}
    for conv_name in plan.filtered:
        found = _upsample(graph, scopes[conv_name]) if conv_name in scopes else None
        if found is not None:
            upsamples[found[1].name] = (conv_name, *found)
    tensors = graph.tensors()
    fusions = []
    for lower, r_lower in plan.filtered.items():
        if lower not in scopes or r_lower < 2:
            continue  # r == 1 has no pool to remove
        pooled = tensors.get(scoped(scopes[lower], G_POOL))
        g_y = _pool_input(graph, scopes[lower])
        if pooled is None or g_y is None:
            _LOG.debug("%s has no pooled output gradient to replace", lower)
            continue
        path = _affine_path(g_y, tuple(plan.conv(lower).y_shape), upsamples)
        if path is None:
            _LOG.debug("%s's output gradient is not a per-channel scaling of an upsample", lower)
            continue
        start = path[0].inp if path else g_y
        upper, patch_grad, upsampled = upsamples[start.name]
        geometries = _matching_geometries(plan, lower, upper)
        if geometries is None:
            _LOG.debug("%s -> %s do not line up", upper, lower)
            continue
        if pooled.shape is not None and tuple(pooled.shape) != geometries[0].g_pooled_shape:
            # Not the pool gradient_filter builds for this geometry; do not guess what it holds.
            _LOG.warning("gradient filter fusion: unexpected pooled gradient of %s; left alone", lower)
            continue
        fusions.append(
            Fusion(lower, upper, patch_grad, upsampled, g_y, pooled, tuple(path), geometries[0], geometries[1])
        )
    return fusions


def _upsample(graph: gs.Graph, scope: str) -> tuple[gs.Variable, gs.Variable] | None:
    """(a, grad_x) of the upsample chain gradient_filter emitted under `scope`, if there is one."""
    nodes = [n for n in graph.nodes if in_role(scope, UPSAMPLE, n.name)]
    if not nodes:
        return None
    ids = {id(n) for n in nodes}
    produced = {id(t) for n in nodes for t in n.outputs}
    sources = {id(t): t for n in nodes for t in n.inputs if isinstance(t, gs.Variable) and id(t) not in produced}
    finals = [t for n in nodes for t in n.outputs if not any(id(c) in ids for c in t.outputs)]
    if len(sources) != 1 or len(finals) != 1:
        return None
    return next(iter(sources.values())), finals[0]


def _pool_input(graph: gs.Graph, scope: str) -> gs.Variable | None:
    """g_y of a filtered conv: the one tensor from outside `scope` that its G_POOL nodes read."""
    readers = [n for n in graph.nodes if in_role(scope, G_POOL, n.name)]
    outside = {
        id(t): t
        for n in readers
        for t in n.inputs
        if isinstance(t, gs.Variable) and not (t.inputs and in_scope(scope, t.inputs[0].name))
    }
    return next(iter(outside.values())) if len(outside) == 1 else None


def _affine_path(g_y: gs.Variable, shape: tuple[int, ...], upsamples: dict[str, tuple]) -> list[_Step] | None:
    """The per-channel gradient ops from some filtered conv's grad_x to `g_y` (NCHW `shape`), in forward order."""
    steps: list[_Step] = []
    tensor = g_y
    while tensor.name not in upsamples:
        if len(steps) >= _MAX_CHAIN or len(tensor.inputs) != 1 or not _may_have_shape(tensor, shape):
            return None
        node = tensor.inputs[0]
        if node.op not in _PATH_OPS or len(node.outputs) != 1:
            return None
        step = _as_step(node, shape)
        if step is None:
            return None
        steps.append(step)
        tensor = step.inp
    if not _may_have_shape(tensor, shape):
        return None
    steps.reverse()
    return steps


def _as_step(node: gs.Node, shape: tuple[int, ...]) -> _Step | None:
    """`node` as a per-channel step whose data input has `shape` (the gradient keeps it), or None."""
    out = node.outputs[0]
    if node.op in ("Identity", "Neg"):
        inp = node.inputs[0] if len(node.inputs) == 1 else None
        return _Step(node, node.op, inp, out, None) if isinstance(inp, gs.Variable) else None
    if len(node.inputs) != 2:
        return None
    # Div: only the dividend may be the gradient, a gradient divisor is not linear in it.
    orders = [node.inputs] if node.op == "Div" else [node.inputs, node.inputs[::-1]]
    for inp, operand in orders:
        if isinstance(inp, gs.Variable) and _may_have_shape(inp, shape) and _per_channel(operand, shape):
            return _Step(node, node.op, inp, out, operand)
    return None


def _may_have_shape(tensor: gs.Tensor, shape: tuple[int, ...]) -> bool:
    # ORT's gradient tensors usually carry shapes; where one does not, the plan's shape stands.
    return tensor.shape is None or _static_shape(tensor) == shape


def _static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int | np.integer) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _per_channel(tensor: gs.Tensor, data_shape: tuple[int, ...]) -> bool:
    """Broadcasts against NCHW `data_shape` as one value per channel (scalar, [C,1,1], [1,C,1,1], ...)."""
    shape = _static_shape(tensor)
    if shape is None or len(shape) > len(data_shape):
        return False
    aligned = (1,) * (len(data_shape) - len(shape)) + shape
    return all(d == 1 for i, d in enumerate(aligned) if i != 1) and aligned[1] in (1, data_shape[1])


def _matching_geometries(plan: Plan, lower: str, upper: str) -> tuple[FilterGeometry, FilterGeometry] | None:
    """(A's, B's) geometry when A's pooling windows are exactly B's upsample blocks, else None."""
    layer_a, layer_b = plan.conv(lower), plan.conv(upper)
    r = plan.filtered[lower]
    try:
        geom_a = filter_geometry(layer_a, r)
        geom_b = filter_geometry(layer_b, plan.filtered[upper])
    except ValueError:
        return None
    lines_up = (
        tuple(layer_a.y_shape) == tuple(layer_b.x_shape)
        and geom_b.patch == (r, r)
        and geom_a.grid == geom_b.grid
        and geom_a.g_pads == geom_b.x_pads
    )
    return (geom_a, geom_b) if lines_up else None


class _PatchGradients:
    """Emits `factor_k * a` at patch resolution: path tensor k (0: grad_x_B) before its upsample."""

    def __init__(self, em: Emitter, fusion: Fusion) -> None:
        self.em = em
        self.fusion = fusion
        self.counts = block_counts(fusion.upper_geometry)
        self.shape = fusion.upper_geometry.x_pooled_shape  # what B's upsample reads
        self.cache: dict[tuple[int, str], gs.Tensor] = {}

    def value(self, k: int, weight: str, out: gs.Variable | None = None) -> gs.Tensor:
        """Patch-resolution stand-in for path tensor k, times `weight`; written into `out` if given.

        weight: "none" (the block value: what a MEAN pool of the path tensor gives),
        "window" (r^2 * block value: what an aligned SUM pool gives), "count" (block value
        times the block's in-image element count: summing it equals summing over pixels).
        """
        key = (k, weight)
        if out is None and key in self.cache:
            return self.cache[key]
        result = self._emit(k, weight, out)
        if out is None:
            self.cache[key] = result
        return result

    def _emit(self, k: int, weight: str, out: gs.Variable | None) -> gs.Tensor:
        # Constant factors fold in numpy; per-channel variables (a trainable BN's scale4)
        # multiply that small tensor, so exactly one op touches the N x C x p_h x p_w tensor.
        constant = np.ones((), dtype=np.float64)
        variables: list[tuple[str, gs.Tensor]] = []
        for step in self.fusion.path[:k]:
            if step.op == "Neg":
                constant = -constant
            elif step.op in ("Mul", "Div") and isinstance(step.operand, gs.Constant):
                values = np.asarray(step.operand.values, dtype=np.float64)
                constant = constant * values if step.op == "Mul" else constant / values
            elif step.op in ("Mul", "Div"):
                variables.append((step.op, step.operand))
        if weight == "count":
            constant = constant * self.counts.astype(np.float64)
        elif weight == "window":
            constant = constant * float(self.fusion.lower_geometry.r**2)
        name = f"k{k}_{weight}"
        em = self.em
        if not variables and constant.size == 1 and float(constant.reshape(-1)[0]) == 1.0:
            if out is None:
                return self.fusion.patch_grad
            return em.op("Identity", name, [self.fusion.patch_grad], self.shape, into=out)
        factor: gs.Tensor = em.const(f"{name}_factor", np.asarray(constant, dtype=np.float32))
        for i, (op, operand) in enumerate(variables):
            factor = em.op(op, f"{name}_factor{i}", [factor, operand])
        return em.op("Mul", name, [self.fusion.patch_grad, factor], self.shape, into=out)


def _fuse(graph: gs.Graph, names: NameAllocator, lower_scope: str, fusion: Fusion) -> None:
    patch = _PatchGradients(Emitter(graph, names, scoped(lower_scope, "fuse")), fusion)
    path_tensors = [fusion.path[0].inp if fusion.path else fusion.g_y] + [step.out for step in fusion.path]
    last = len(path_tensors) - 1

    # 1. g^_A from `a`, written into A's G_POOL tensor so A's readers stay as they are; the
    #    old pool chain loses its only output and is cleaned up.
    for node in list(fusion.pooled.inputs):
        node.outputs.clear()
    patch.value(last, "window" if fusion.pooled_holds_sums else "none", out=fusion.pooled)

    # 2. Exact patch-resolution forms of full-resolution reductions over the path tensors.
    for k, tensor in enumerate(path_tensors):
        for node in list(tensor.outputs):
            if node.op == "ReduceSum" and node.inputs[0] is tensor and _reduces_spatial(node):
                node.inputs[0] = patch.value(k, "count")


def _reduces_spatial(node: gs.Node) -> bool:
    """ReduceSum of an NCHW tensor whose axes include both spatial axes (rank kept or not)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes_tensor = node.inputs[1]
        if not isinstance(axes_tensor, gs.Constant):
            return False
        axes = [int(a) for a in np.asarray(axes_tensor.values).reshape(-1)]
    else:
        axes = list(node.attrs.get("axes", []))
        if not axes:
            return not node.attrs.get("noop_with_empty_axes", 0)  # empty axes: everything
    normalized = {a % 4 for a in axes}
    return {2, 3} <= normalized


_SPLIT_OPS = ("Split", "SplitTraining")


def _channel_slices(node: gs.Node, source: gs.Variable, channels: int) -> list[tuple[gs.Variable, int, int]] | None:
    """(output, first channel, end channel) of a channel split of `source`, from the static output shapes."""
    if node.op not in _SPLIT_OPS or not node.inputs or node.inputs[0] is not source:
        return None
    if int(node.attrs.get("axis", 0)) % 4 != 1:
        return None
    slices, start = [], 0
    for out in node.outputs:
        shape = _static_shape(out)
        if shape is None or len(shape) != 4:
            return None
        slices.append((out, start, start + shape[1]))
        start += shape[1]
    return slices if start == channels else None


def _reduce_split_upsample(graph: gs.Graph, names: NameAllocator, plan: Plan, conv_name: str) -> None:
    """Sum the used channel slices of `conv_name`'s upsampled input gradient at patch resolution, if that is all its use."""
    scope = plan.generated.filter_scopes.get(conv_name)
    found = _upsample(graph, scope) if scope is not None else None
    if found is None:
        return
    patch_grad, upsampled = found
    layer = plan.conv(conv_name)
    try:
        geom = filter_geometry(layer, plan.filtered[conv_name])
    except ValueError:
        return
    if (
        upsampled in graph.outputs
        or _static_shape(patch_grad) != geom.x_pooled_shape
        or _static_shape(upsampled) != tuple(layer.x_shape)
        or not upsampled.outputs
    ):
        return
    plans = []
    for split in upsampled.outputs:
        slices = _channel_slices(split, upsampled, layer.x_shape[1])
        if slices is None:
            return
        for out, start, end in slices:
            if out in graph.outputs:
                return
            if not all(r.op == "ReduceSum" and r.inputs[0] is out and _reduces_spatial(r) for r in out.outputs):
                return
            plans.extend((out, start, end, reader) for reader in out.outputs)
    # Sum over in-image pixels of a block-constant map == sum over blocks of count * value.
    em = Emitter(graph, names, scoped(scope, "split_sum"))
    counts = em.const("counts", block_counts(geom).reshape(1, 1, *geom.grid))
    weighted: dict[tuple[int, int], gs.Variable] = {}
    n, _, p_h, p_w = geom.x_pooled_shape
    for i, (_, start, end, reader) in enumerate(plans):
        key = (start, end)
        if key not in weighted:
            shape = [n, end - start, p_h, p_w]
            bounds = [em.ints([start], f"{i}_starts"), em.ints([end], f"{i}_ends"), em.ints([1], f"{i}_axes")]
            sliced = em.op("Slice", f"{i}_slice", [patch_grad, *bounds], shape)
            weighted[key] = em.op("Mul", f"{i}_weighted", [sliced, counts], shape)
        reader.inputs[0] = weighted[key]
    for split in list(upsampled.outputs):
        split.outputs.clear()  # every used output is now fed at patch resolution
    _LOG.info("%s's input gradient summed at patch resolution", conv_name)


__all__ = ["FACTS", "REQUIRES", "STAGE", "Fusion", "find_fusions", "run"]
