"""Float64 numpy reference of the gradient-filtering backward of one Conv.

Transcribes Yang, Li, Marculescu, "Efficient On-device Training via Gradient
Filtering" (CVPR 2023) as used by gfcompile. Notation (per axis, h shown):

    p_h  = ceil(H_y / r)                    patches per axis
    R_h  = r * s_h                          input rows covered by one patch
    px_h = ceil((p_h * R_h - H_x) / 2)      top pad of x (negative: crop)
    pg_h = ceil((p_h * r   - H_y) / 2)      top pad of g_y (always 0 <= pg_h < r)

    x~  = SUM-pool of x over R x R windows            N x C_in  x p_h x p_w
    g^  = MEAN-pool of g_y over r x r windows,
          averaging in-image elements only            N x C_out x p_h x p_w
    W~  = sum of W over its taps                      C_out x C_in/g

    grad_x = crop(upsample_R(W~^T g^)) / (s_h s_w)
    grad_W[co, ci, u, v] = sum_{n,i,j} g^[n,co,i,j] x~[n, grp(co)*C_in/g + ci, i, j] / (s_h s_w)
    grad_b = sum_{n,h,w} g_y

Windows are described in *original* coordinates: patch i of x covers rows
[i*R_h - px_h, (i+1)*R_h - px_h); rows outside [0, H_x) contribute zeros. This one
rule covers both a positive pad (zeros added) and a negative pad (rows cropped), so
there is no special case for either.

Clarity over speed: every step is one small, named function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ceil_div(a: int, b: int) -> int:
    # Integer ceil(a / b), exact for negative a too (float ceil would risk rounding).
    return -((-a) // b)


def filter_geometry(x_shape: Sequence[int], y_shape: Sequence[int], strides: Sequence[int], r: int) -> dict[str, int]:
    """Patch geometry of one filtered conv; only the last two dims of the shapes are used.

    Returns p_h, p_w, R_h, R_w, px_h, px_w, pg_h, pg_w as in the module docstring, plus
    r, s_h, s_w, H_x, W_x, H_y, W_y so that downstream helpers need nothing else.
    """
    if r < 1:
        raise ValueError(f"patch size r must be >= 1, got {r}")
    H_x, W_x = int(x_shape[-2]), int(x_shape[-1])
    H_y, W_y = int(y_shape[-2]), int(y_shape[-1])
    s_h, s_w = int(strides[0]), int(strides[1])
    p_h, p_w = _ceil_div(H_y, r), _ceil_div(W_y, r)
    R_h, R_w = r * s_h, r * s_w
    return {
        "r": r,
        "s_h": s_h,
        "s_w": s_w,
        "H_x": H_x,
        "W_x": W_x,
        "H_y": H_y,
        "W_y": W_y,
        "p_h": p_h,
        "p_w": p_w,
        "R_h": R_h,
        "R_w": R_w,
        "px_h": _ceil_div(p_h * R_h - H_x, 2),
        "px_w": _ceil_div(p_w * R_w - W_x, 2),
        "pg_h": _ceil_div(p_h * r - H_y, 2),
        "pg_w": _ceil_div(p_w * r - W_y, 2),
    }


def _window(a: np.ndarray, axis: int, start: int, length: int) -> np.ndarray:
    """a[start : start + length] along `axis`, with zeros where the index is outside a.

    `start` may be negative (leading zeros = padding) and start + length may exceed the
    size (trailing zeros); a positive start crops. This is the only pad/crop primitive.
    """
    size = a.shape[axis]
    out_shape = list(a.shape)
    out_shape[axis] = length
    out = np.zeros(out_shape, dtype=a.dtype)
    lo, hi = max(start, 0), min(start + length, size)
    if hi > lo:
        dst = [slice(None)] * a.ndim
        src = [slice(None)] * a.ndim
        dst[axis] = slice(lo - start, hi - start)
        src[axis] = slice(lo, hi)
        out[tuple(dst)] = a[tuple(src)]
    return out


def _window2d(a: np.ndarray, start_h: int, len_h: int, start_w: int, len_w: int) -> np.ndarray:
    return _window(_window(a, 2, start_h, len_h), 3, start_w, len_w)


def _block_sum(a: np.ndarray, b_h: int, b_w: int) -> np.ndarray:
    """Sum over non-overlapping b_h x b_w blocks of an N x C x (P*b_h) x (Q*b_w) array."""
    n, c, h, w = a.shape
    return a.reshape(n, c, h // b_h, b_h, w // b_w, b_w).sum(axis=(3, 5))


def sum_pool_input(x: np.ndarray, geom: dict[str, int]) -> np.ndarray:
    """x~: SUM-pool of x over R_h x R_w windows (stride R), top/left pad px (crop if < 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-2:] != (geom["H_x"], geom["W_x"]):
        raise ValueError(f"x spatial shape {x.shape[-2:]} does not match geometry")
    p_h, p_w, R_h, R_w = geom["p_h"], geom["p_w"], geom["R_h"], geom["R_w"]
    covered = _window2d(x, -geom["px_h"], p_h * R_h, -geom["px_w"], p_w * R_w)
    return _block_sum(covered, R_h, R_w)


def mean_pool_grad(g_y: np.ndarray, geom: dict[str, int]) -> np.ndarray:
    """g^: MEAN-pool of g_y over r x r windows (stride r, top/left pad pg).

    The divisor is the number of in-image elements of each window, not r*r: padding
    is not gradient, and with this divisor mean_pool(upsample(g^)) == g^ exactly, i.e.
    filtering a gradient that is already constant on patches changes nothing.
    """
    g_y = np.asarray(g_y, dtype=np.float64)
    if g_y.shape[-2:] != (geom["H_y"], geom["W_y"]):
        raise ValueError(f"g_y spatial shape {g_y.shape[-2:]} does not match geometry")
    r, p_h, p_w = geom["r"], geom["p_h"], geom["p_w"]
    start_h, start_w = -geom["pg_h"], -geom["pg_w"]
    sums = _block_sum(_window2d(g_y, start_h, p_h * r, start_w, p_w * r), r, r)
    ones = np.ones((1, 1) + g_y.shape[-2:])
    counts = _block_sum(_window2d(ones, start_h, p_h * r, start_w, p_w * r), r, r)
    return sums / counts


def upsample_crop(a: np.ndarray, block_h: int, block_w: int, top: int, left: int, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-upsample each pixel of `a` into a block_h x block_w block, then keep rows
    [top, top + out_h) and cols [left, left + out_w) of the result (zeros outside it).
    """
    up = np.repeat(np.repeat(a, block_h, axis=2), block_w, axis=3)
    return _window2d(up, top, out_h, left, out_w)


def upsample_grad(g_hat: np.ndarray, geom: dict[str, int]) -> np.ndarray:
    """g^ broadcast back onto the H_y x W_y output grid (inverse layout of mean_pool_grad)."""
    r = geom["r"]
    return upsample_crop(g_hat, r, r, geom["pg_h"], geom["pg_w"], geom["H_y"], geom["W_y"])


def _mix_to_input(w_mat: np.ndarray, g: np.ndarray, group: int) -> np.ndarray:
    """Per pixel, out[n, ci] = sum_co w_mat[co, ci_local] g[n, co] within each group.

    w_mat is C_out x C_in/g, g is N x C_out x H x W; the result is N x C_in x H x W.
    This is W~^T g for groups == 1, block-diagonal for grouped and elementwise for
    depthwise convs (C_in/g == 1), all through the same grouped einsum.
    """
    c_out, cin_g = w_mat.shape
    n, _, h, w = g.shape
    w_grp = w_mat.reshape(group, c_out // group, cin_g)
    g_grp = g.reshape(n, group, c_out // group, h, w)
    return np.einsum("goc,ngohw->ngchw", w_grp, g_grp).reshape(n, group * cin_g, h, w)


def reduced_dilations(dilations: Sequence[int], r: int) -> tuple[int, int]:
    """Dilation of the reduced-resolution transposed conv per axis; 0 = use the W~ form.

    An axis with d > 1 and d >= r keeps its taps apart at the patch resolution
    (dilation d // r, e.g. ASPP d=12, r=2 -> 6). For d < r, d // r == 0: all taps land
    in the same patch, which is exactly the summed-tap W~ form, as for undilated axes
    (d == 1, where the paper always uses W~, even for r == 1).
    """
    d_h, d_w = int(dilations[0]), int(dilations[1])
    return (d_h // r if d_h > 1 else 0, d_w // r if d_w > 1 else 0)


def _filtered_input_grad(W: np.ndarray, g_hat: np.ndarray, group: int, dil: tuple[int, int]) -> np.ndarray:
    """g^x at patch resolution: W~^T g^ (1x1 form) or the dilated transposed conv."""
    if dil == (0, 0):
        return _mix_to_input(W.sum(axis=(2, 3)), g_hat, group)

    # Transposed ('data gradient') conv of a stride-1 conv with weight W, dilation dd and
    # 'same' padding dd*(k-1)/2 at the p_h x p_w resolution. For the forward relation
    # z[i] = sum_u W[u] a[i + u*dd - pad] its adjoint is
    # a_grad[m] = sum_u W[u] z_grad[m - u*dd + pad], one shifted channel mix per tap.
    # An axis with dd == 0 gets shift 0 for all its taps, i.e. they are summed (W~ form).
    # For even k, (k-1)/2 is not integral; the top/left pad takes the floor (as ONNX
    # SAME_UPPER does for the forward conv).
    _, _, k_h, k_w = W.shape
    dd_h, dd_w = dil
    pad_h, pad_w = dd_h * (k_h - 1) // 2, dd_w * (k_w - 1) // 2
    n, _, p_h, p_w = g_hat.shape
    out = np.zeros((n, W.shape[1] * group, p_h, p_w))
    for u in range(k_h):
        for v in range(k_w):
            shifted = _window2d(g_hat, pad_h - u * dd_h, p_h, pad_w - v * dd_w, p_w)
            out += _mix_to_input(W[:, :, u, v], shifted, group)
    return out


def _conv_out_size(size: int, k: int, s: int, pad_total: int, d: int) -> int:
    return (size + pad_total - d * (k - 1) - 1) // s + 1


def gradient_filter_backward(
    x: np.ndarray,
    W: np.ndarray,
    g_y: np.ndarray,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int,
    r: int,
    paper_stride_scaling: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient-filtered (grad_x, grad_W, grad_b) of an ONNX Conv, in float64.

    x: N x C_in x H_x x W_x, W: C_out x C_in/g x k_h x k_w, g_y: N x C_out x H_y x W_y.
    `pads` is ONNX (top, left, bottom, right); it does not enter the filtered math and
    is only used to check that g_y really has the conv's output shape.
    `paper_stride_scaling=True` omits the 1/(s_h*s_w) factor like the paper's code.
    """
    x = np.asarray(x, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    g_y = np.asarray(g_y, dtype=np.float64)
    n, c_in, H_x, W_x = x.shape
    c_out, cin_g, k_h, k_w = W.shape
    if c_in != cin_g * group or c_out % group != 0:
        raise ValueError(f"channels C_in={c_in}, W={W.shape} do not fit group={group}")
    expected_y = (
        n,
        c_out,
        _conv_out_size(H_x, k_h, strides[0], pads[0] + pads[2], dilations[0]),
        _conv_out_size(W_x, k_w, strides[1], pads[1] + pads[3], dilations[1]),
    )
    if g_y.shape != expected_y:
        raise ValueError(f"g_y has shape {g_y.shape}, the conv produces {expected_y}")

    geom = filter_geometry(x.shape, g_y.shape, strides, r)
    # The paper's code drops this factor; without it, a strided layer's filtered
    # gradient is s_h*s_w times too large because an R x R input patch holds s_h*s_w
    # times more pixels than the r x r output patch it feeds.
    scale = 1.0 if paper_stride_scaling else float(geom["s_h"] * geom["s_w"])

    x_tilde = sum_pool_input(x, geom)
    g_hat = mean_pool_grad(g_y, geom)

    g_hat_x = _filtered_input_grad(W, g_hat, group, reduced_dilations(dilations, r))
    grad_x = upsample_crop(g_hat_x, geom["R_h"], geom["R_w"], geom["px_h"], geom["px_w"], H_x, W_x)
    grad_x /= scale

    # One C_out x C_in/g value per (co, ci), shared by every tap (u, v).
    p_h, p_w = geom["p_h"], geom["p_w"]
    g_grp = g_hat.reshape(n, group, c_out // group, p_h, p_w)
    x_grp = x_tilde.reshape(n, group, cin_g, p_h, p_w)
    per_tap = np.einsum("ngohw,ngchw->goc", g_grp, x_grp).reshape(c_out, cin_g) / scale
    grad_W = np.repeat(np.repeat(per_tap[:, :, None, None], k_h, axis=2), k_w, axis=3)

    grad_b = g_y.sum(axis=(0, 2, 3))
    return grad_x, grad_W, grad_b
