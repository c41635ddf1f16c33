"""Conv geometry that several passes and the tools share. Not a pass: pure functions of shapes.

* `explicit_pads`: ONNX pads (top, left, bottom, right) from a conv's or pool's `auto_pad`.
  The one resolver: planning, gradient_filter and row-tiling chain discovery all use it.
* `FilterGeometry` / `filter_geometry`: the patch geometry of a gradient-filtered conv
  (`passes.gradient_filter` builds it, `passes.gradient_filter_fusion` lines two up).
* `g_pool_holds_sums`: what gradient_filter's pooled output gradient g^ holds.
* `filtered_cost`: the paper's analytic per-layer cost (compile table, inspect, benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .base import ConvLayer

_FLOAT_BYTES = 4
AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def ceil_div(a: int, b: int) -> int:
    """Exact integer ceil(a / b), also right for negative a (pads that crop)."""
    return -((-a) // b)


def explicit_pads(
    auto_pad: str | bytes | None,
    pads: Sequence[int] | None,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[int, int, int, int]:
    """2-D ONNX pads (top, left, bottom, right) that `auto_pad` means for an input of `spatial` (H, W).

    NOTSET (or empty) keeps `pads` (default zeros); SAME_UPPER puts the odd pad at the end,
    SAME_LOWER at the start. ValueError for any other auto_pad value.
    """
    mode = (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) or "NOTSET"
    if mode == "NOTSET":
        values = tuple(int(p) for p in (pads if pads is not None else (0, 0, 0, 0)))
        if len(values) != 4:
            raise ValueError(f"expected 4 pads for a 2-D window, got {list(values)}")
        return values  # type: ignore[return-value]
    if mode == "VALID":
        return (0, 0, 0, 0)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {mode!r}")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (ceil_div(int(size), int(s)) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return (int(begins[0]), int(begins[1]), int(ends[0]), int(ends[1]))


@dataclass(frozen=True)
class FilterGeometry:
    """Patch geometry of one filtered conv (static, batch included in the shapes).

    `x_pads` / `g_pads` are ONNX-ordered (top, left, bottom, right); a negative x pad
    crops. `reduced_dilations[i]` is the dilation of the patch-resolution transposed
    conv on axis i, 0 where that axis uses the summed-tap W~ form.
    """

    layer: str
    r: int
    strides: tuple[int, int]
    patch: tuple[int, int]
    grid: tuple[int, int]
    x_pads: tuple[int, int, int, int]
    g_pads: tuple[int, int, int, int]
    reduced_dilations: tuple[int, int]
    x_pooled_shape: tuple[int, int, int, int]
    g_pooled_shape: tuple[int, int, int, int]

    @property
    def x_aligned(self) -> bool:
        """x tiles into R x R windows exactly, so its pool is a plain block sum."""
        return self.x_pads == (0, 0, 0, 0)

    @property
    def g_aligned(self) -> bool:
        """g_y tiles into r x r windows exactly: every mean divides by r*r."""
        return self.g_pads == (0, 0, 0, 0)

    @property
    def spatial(self) -> bool:
        """grad_x needs the dilated transposed conv rather than the W~ channel mix."""
        return self.reduced_dilations != (0, 0)


def filter_geometry(layer: ConvLayer, r: int) -> FilterGeometry:
    """The patch geometry of `layer` filtered with patch size `r`; ValueError if impossible."""
    where = f"gradient filter on conv {layer.node!r}"
    if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
        raise ValueError(f"{where}: patch size r must be an integer >= 1, got {r!r}")
    r = int(r)
    dims = (*layer.x_shape, *layer.y_shape, *layer.kernel, *layer.strides, *layer.dilations)
    if len(layer.x_shape) != 4 or len(layer.y_shape) != 4 or min(dims) < 1:
        raise ValueError(f"{where}: needs static NCHW shapes and positive geometry, got {layer}")
    if min(layer.pads) < 0:
        raise ValueError(f"{where}: negative conv pads {layer.pads} are not supported")
    n, c_in, h_x, w_x = layer.x_shape
    n_y, c_out, h_y, w_y = layer.y_shape
    group = layer.group
    if n_y != n or group < 1 or c_in % group or c_out % group:
        raise ValueError(f"{where}: shapes {layer.x_shape} -> {layer.y_shape} do not fit group={group}")
    for axis, (size, out) in enumerate(((h_x, h_y), (w_x, w_y))):
        pad_total = layer.pads[axis] + layer.pads[axis + 2]
        expected = (size + pad_total - layer.dilations[axis] * (layer.kernel[axis] - 1) - 1) // layer.strides[axis] + 1
        if expected != out:
            raise ValueError(
                f"{where}: output size {out} on axis {axis + 2} does not follow from input {size}, "
                f"kernel {layer.kernel}, strides {layer.strides}, pads {layer.pads}, dilations {layer.dilations}"
            )

    s_h, s_w = layer.strides
    p_h, p_w = ceil_div(h_y, r), ceil_div(w_y, r)
    R_h, R_w = r * s_h, r * s_w
    x_tot = (p_h * R_h - h_x, p_w * R_w - w_x)
    g_tot = (p_h * r - h_y, p_w * r - w_y)
    x_begin = tuple(ceil_div(t, 2) for t in x_tot)
    g_begin = tuple(ceil_div(t, 2) for t in g_tot)
    # d // r: a tap offset of d output rows is d / r patches (stride-1 ASPP, the case the
    # method targets; strided dilated convs use the same rule, like the numpy reference).
    # For 1 < d < r all taps land in one patch, which is exactly the W~ form (as for d == 1).
    reduced = tuple(d // r if d > 1 else 0 for d in layer.dilations)
    return FilterGeometry(
        layer=layer.node,
        r=r,
        strides=(s_h, s_w),
        patch=(R_h, R_w),
        grid=(p_h, p_w),
        x_pads=(x_begin[0], x_begin[1], x_tot[0] - x_begin[0], x_tot[1] - x_begin[1]),
        g_pads=(g_begin[0], g_begin[1], g_tot[0] - g_begin[0], g_tot[1] - g_begin[1]),
        reduced_dilations=(int(reduced[0]), int(reduced[1])),
        x_pooled_shape=(n, c_in, p_h, p_w),
        g_pooled_shape=(n, c_out, p_h, p_w),
    )


def filtered_cost(layer: ConvLayer, r: int, *, grad_x: bool = True) -> dict[str, float | int | str]:
    """Analytic per-layer cost at batch 1, vanilla backward vs gradient filtering.

    Activation bytes are the float32 bytes of the conv's input kept for the backward:
    vanilla C_in*H_x*W_x*4, filtered C_in*p_h*p_w*4 (x~).

    FLOPs count a multiply-add as 2 and an addition as 1; copies count 0.
    - vanilla: grad_W and (if `grad_x`) grad_x are each one GEMM as large as the
      forward conv, i.e. 2 * MACs each, MACs = C_out*H_y*W_y*(C_in/g)*k_h*k_w.
    - filtered: the r x r mean pool of g_y (C_out*H_y*W_y adds) + grad_W
      (2*C_out*(C_in/g)*p_h*p_w) + grad_x (2*C_out*(C_in/g)*p_h*p_w for the W~ mix,
      times the taps the dilated form keeps: those that land inside the grid). The
      nearest upsample of grad_x moves C_in*H_x*W_x elements and does no arithmetic;
      it is reported as `upsample_elements`. grad_b is exact in both and left out.
    """
    geom = filter_geometry(replace(layer, x_shape=(1, *layer.x_shape[1:]), y_shape=(1, *layer.y_shape[1:])), r)
    _, c_in, h_x, w_x = layer.x_shape
    _, c_out, h_y, w_y = layer.y_shape
    cin_g = c_in // layer.group
    p_h, p_w = geom.grid
    macs = c_out * h_y * w_y * cin_g * layer.kernel[0] * layer.kernel[1]
    vanilla = 2 * macs * (2 if grad_x else 1)
    taps = 1
    for k, d, grid in zip(layer.kernel, geom.reduced_dilations, geom.grid, strict=True):
        taps *= tap_plan(k, d, grid)[1] if d else 1
    mix = 2 * c_out * cin_g * p_h * p_w
    filtered = c_out * h_y * w_y + mix + (mix * taps if grad_x else 0)
    vanilla_bytes = c_in * h_x * w_x * _FLOAT_BYTES
    filtered_bytes = c_in * p_h * p_w * _FLOAT_BYTES
    return {
        "layer": layer.node,
        "r": geom.r,
        "vanilla_activation_bytes": vanilla_bytes,
        "filtered_activation_bytes": filtered_bytes,
        "activation_ratio": vanilla_bytes / filtered_bytes,
        "vanilla_backward_flops": vanilla,
        "filtered_backward_flops": filtered,
        "flops_ratio": vanilla / filtered,
        "upsample_elements": c_in * h_x * w_x if grad_x else 0,
    }


def tap_plan(k: int, d: int, grid: int) -> tuple[int, int, int, int]:
    """One axis of the patch-resolution ConvTranspose: (first tap, taps kept, pad begin, pad end).

    'same' padding is d*(k-1) in total with the floor at the top/left. Tap u reads
    g^[m + pad - u*d]; a tap shifted by a whole grid or more reads only zeros, so it is
    dropped (ASPP d=36 at r=2 on a 17-patch map keeps only its centre tap: 1/9 the work).
    """
    pad = d * (k - 1) // 2
    kept = [u for u in range(k) if abs(pad - u * d) <= grid - 1]
    if kept and pad - kept[0] * d >= 0 and kept[-1] * d - pad >= 0:
        return kept[0], len(kept), pad - kept[0] * d, kept[-1] * d - pad
    return 0, k, pad, d * (k - 1) - pad


def g_pool_holds_sums(geom: FilterGeometry) -> bool:
    """Whether gradient_filter's g^ holds window SUMS (else exact in-image MEANS).

    Aligned windows (all full) are block-summed and the 1/r^2 folds into small tensors
    downstream; unaligned ones are exact means over the in-image elements, as the method
    defines. With r == 1 g^ is g_y itself (sum and mean agree).
    """
    return geom.g_aligned


def window_counts(size: int, r: int, begin: int, count: int) -> np.ndarray:
    """In-image element count of each of `count` windows of `r` along an axis of `size` (pad `begin`)."""
    starts = np.arange(count) * r - begin
    return np.minimum(starts + r, size) - np.maximum(starts, 0)


def block_counts(geom: FilterGeometry) -> np.ndarray:
    """p_h x p_w in-image element counts of the upsample blocks of `geom` (the image is x's H x W)."""
    per_axis = []
    for axis in range(2):
        size = geom.grid[axis] * geom.patch[axis] - geom.x_pads[axis] - geom.x_pads[axis + 2]
        per_axis.append(window_counts(size, geom.patch[axis], geom.x_pads[axis], geom.grid[axis]))
    return np.outer(per_axis[0], per_axis[1]).astype(np.float32)
