"""Gradient filtering in PyTorch eager mode: the authors' approach, as a baseline.

The forward is the exact conv, but autograd keeps only the sum-pooled input x~ (and W)
instead of x, which is where the memory saving of gradient filtering comes from. The
backward implements the same equations as `gradient_filter_numpy` (see its docstring
for the notation) with vectorised torch ops, so it can be timed against the compiled
ONNX training graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .gradient_filter_numpy import filter_geometry, reduced_dilations

Pads4 = tuple[int, int, int, int]


def _block_sum(a: torch.Tensor, b_h: int, b_w: int) -> torch.Tensor:
    n, c, h, w = a.shape
    return a.reshape(n, c, h // b_h, b_h, w // b_w, b_w).sum(dim=(3, 5))


def _cover(a: torch.Tensor, top: int, len_h: int, left: int, len_w: int) -> torch.Tensor:
    """Rows [top, top+len_h), cols [left, left+len_w) of a, zero outside a.

    F.pad with a negative amount crops, so one call handles both padding and cropping.
    """
    h, w = a.shape[-2:]
    return F.pad(a, (-left, left + len_w - w, -top, top + len_h - h))


def sum_pool_input(x: torch.Tensor, geom: dict[str, int]) -> torch.Tensor:
    """x~ = SUM-pool of x over R x R windows with top/left pad px (crop if negative)."""
    R_h, R_w = geom["R_h"], geom["R_w"]
    covered = _cover(x, -geom["px_h"], geom["p_h"] * R_h, -geom["px_w"], geom["p_w"] * R_w)
    return _block_sum(covered, R_h, R_w)


def mean_pool_grad(g_y: torch.Tensor, geom: dict[str, int]) -> torch.Tensor:
    """g^ = MEAN-pool of g_y over r x r windows, dividing by in-image element counts."""
    r, p_h, p_w = geom["r"], geom["p_h"], geom["p_w"]
    top, left = -geom["pg_h"], -geom["pg_w"]
    sums = _block_sum(_cover(g_y, top, p_h * r, left, p_w * r), r, r)
    # avg_pool2d cannot express the asymmetric pad; the counts are an outer product of
    # per-axis counts, which is tiny to build on every call.
    ones_h = g_y.new_ones(1, 1, geom["H_y"], 1)
    ones_w = g_y.new_ones(1, 1, 1, geom["W_y"])
    cnt_h = _block_sum(_cover(ones_h, top, p_h * r, 0, 1), r, 1)
    cnt_w = _block_sum(_cover(ones_w, 0, 1, left, p_w * r), 1, r)
    return sums / (cnt_h * cnt_w)


def _upsample_crop(a: torch.Tensor, geom: dict[str, int]) -> torch.Tensor:
    """Broadcast each patch pixel into an R_h x R_w block, keep rows/cols [px, px + H_x)."""
    n, c, p_h, p_w = a.shape
    R_h, R_w = geom["R_h"], geom["R_w"]
    up = a[:, :, :, None, :, None].expand(n, c, p_h, R_h, p_w, R_w)
    up = up.reshape(n, c, p_h * R_h, p_w * R_w)
    return _cover(up, geom["px_h"], geom["H_x"], geom["px_w"], geom["W_x"])


def _mix_to_input(w_mat: torch.Tensor, g: torch.Tensor, group: int) -> torch.Tensor:
    """Grouped per-pixel channel mix W~^T g (block-diagonal / elementwise for depthwise)."""
    c_out, cin_g = w_mat.shape
    n, _, h, w = g.shape
    w_grp = w_mat.reshape(group, c_out // group, cin_g)
    g_grp = g.reshape(n, group, c_out // group, h, w)
    return torch.einsum("goc,ngohw->ngchw", w_grp, g_grp).reshape(n, group * cin_g, h, w)


def _filtered_input_grad(weight: torch.Tensor, g_hat: torch.Tensor, group: int, dil: tuple[int, int]) -> torch.Tensor:
    if dil == (0, 0):
        return _mix_to_input(weight.sum(dim=(2, 3)), g_hat, group)
    # Dilated form: transposed conv at patch resolution. An axis with reduced dilation
    # 0 has all its taps in one patch, so they are summed first (k becomes 1 there).
    w = weight
    if dil[0] == 0:
        w = w.sum(dim=2, keepdim=True)
    if dil[1] == 0:
        w = w.sum(dim=3, keepdim=True)
    dd_h, dd_w = max(dil[0], 1), max(dil[1], 1)
    k_h, k_w = w.shape[-2:]
    full = F.conv_transpose2d(g_hat, w, groups=group, dilation=(dd_h, dd_w))
    # padding=0 gives p + dd*(k-1) rows; keeping [dd*(k-1)//2, ... + p) is the 'same'
    # padding, with the floor on top/left for even k (conv_transpose2d only takes
    # symmetric padding).
    top, left = (dd_h * (k_h - 1)) // 2, (dd_w * (k_w - 1)) // 2
    p_h, p_w = g_hat.shape[-2:]
    return full[:, :, top : top + p_h, left : left + p_w]


class GradientFilterConv2dFunction(torch.autograd.Function):
    """Exact conv forward; gradient-filtered backward that needs only x~ and W.

    apply(x, weight, bias, strides, pads, dilations, group, r, paper_stride_scaling)
    with ONNX-order pads (top, left, bottom, right); bias may be None.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        strides: tuple[int, int],
        pads: Pads4,
        dilations: tuple[int, int],
        group: int,
        r: int,
        paper_stride_scaling: bool = False,
    ) -> torch.Tensor:
        top, left, bottom, right = pads
        if top == bottom and left == right:
            y = F.conv2d(x, weight, bias, strides, (top, left), dilations, group)
        else:
            x_pad = F.pad(x, (left, right, top, bottom))
            y = F.conv2d(x_pad, weight, bias, strides, 0, dilations, group)
        geom = filter_geometry(x.shape, y.shape, strides, r)
        # Saving x~ instead of x is the whole point: it is (r*s)^2 times smaller.
        ctx.save_for_backward(sum_pool_input(x, geom), weight)
        ctx.geom = geom
        ctx.group = group
        ctx.dil = reduced_dilations(dilations, r)
        ctx.has_bias = bias is not None
        ctx.scale = 1.0 if paper_stride_scaling else float(strides[0] * strides[1])
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x_tilde, weight = ctx.saved_tensors
        geom, group, scale = ctx.geom, ctx.group, ctx.scale
        g_hat = mean_pool_grad(g_y, geom)

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_hat_x = _filtered_input_grad(weight, g_hat, group, ctx.dil)
            # Dividing before upsampling touches (R_h*R_w)x fewer elements.
            grad_x = _upsample_crop(g_hat_x / scale, geom)
        if ctx.needs_input_grad[1]:
            n, c_out = g_hat.shape[:2]
            cin_g = weight.shape[1]
            p_h, p_w = geom["p_h"], geom["p_w"]
            per_tap = torch.einsum(
                "ngohw,ngchw->goc",
                g_hat.reshape(n, group, c_out // group, p_h, p_w),
                x_tilde.reshape(n, group, cin_g, p_h, p_w),
            ).reshape(c_out, cin_g)
            # Same value for every tap; materialised so .grad is a normal tensor.
            grad_w = (per_tap / scale)[:, :, None, None].expand_as(weight).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_y.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def conv_onnx_pads(conv: nn.Conv2d) -> Pads4:
    """ONNX (top, left, bottom, right) pads equivalent to an nn.Conv2d's padding."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding is supported, got {conv.padding_mode!r}")
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        # Same split as torch's 'same': the extra pixel of an odd total goes at the end.
        tot_h = conv.dilation[0] * (conv.kernel_size[0] - 1)
        tot_w = conv.dilation[1] * (conv.kernel_size[1] - 1)
        return (tot_h // 2, tot_w // 2, tot_h - tot_h // 2, tot_w - tot_w // 2)
    p_h, p_w = conv.padding  # type: ignore[misc]
    return (p_h, p_w, p_h, p_w)


class GradientFilterConv2d(nn.Module):
    """Drop-in replacement of an nn.Conv2d whose backward is gradient-filtered.

    Shares the Parameter objects of the conv it was built from, so optimizers and
    state dicts keep working.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        stride: Sequence[int],
        pads: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        r: int,
        paper_stride_scaling: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.stride = (int(stride[0]), int(stride[1]))
        top, left, bottom, right = (int(p) for p in pads)
        self.pads: Pads4 = (top, left, bottom, right)
        self.dilation = (int(dilation[0]), int(dilation[1]))
        self.groups = int(groups)
        self.r = int(r)
        self.paper_stride_scaling = bool(paper_stride_scaling)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, r: int, paper_stride_scaling: bool = False) -> GradientFilterConv2d:
        return cls(
            conv.weight,
            conv.bias,
            conv.stride,
            conv_onnx_pads(conv),
            conv.dilation,
            conv.groups,
            r,
            paper_stride_scaling,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradientFilterConv2dFunction.apply(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.pads,
            self.dilation,
            self.groups,
            self.r,
            self.paper_stride_scaling,
        )

    def extra_repr(self) -> str:
        c_out, cin_g, k_h, k_w = self.weight.shape
        return (
            f"{cin_g * self.groups}, {c_out}, kernel_size=({k_h}, {k_w}), "
            f"stride={self.stride}, pads={self.pads}, dilation={self.dilation}, "
            f"groups={self.groups}, r={self.r}, "
            f"paper_stride_scaling={self.paper_stride_scaling}"
        )


def replace_last_convs(model: nn.Module, n: int, r: int, paper_stride_scaling: bool = False) -> list[str]:
    """Swap the last n nn.Conv2d of `model` (registration order) for filtered ones.

    Works in place and returns the qualified names of the replaced modules, first to
    last. "Last" follows named_modules() order, which is the order the backward of a
    sequential network reaches first, i.e. the layers the paper fine-tunes.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not 0 <= n <= len(convs):
        raise ValueError(f"cannot replace {n} convs, the model has {len(convs)}")
    chosen = convs[len(convs) - n :]
    replace_convs(model, dict.fromkeys(chosen, r), paper_stride_scaling)
    return chosen


def replace_convs(model: nn.Module, patch_sizes: dict[str, int], paper_stride_scaling: bool = False) -> None:
    """Swap the named nn.Conv2d modules for filtered ones, each with its own r (in place)."""
    for name, r in patch_sizes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, attr)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name!r} is not an nn.Conv2d")
        setattr(parent, attr, GradientFilterConv2d.from_conv(conv, r, paper_stride_scaling))
