"""Rewrite Resize (nearest and bilinear upsampling/downsampling) into ops with CPU gradients.

Contract
--------
Input: any loaded model (legalize stage, no Plan yet) whose Resize nodes change only the last
two axes of a rank-4 tensor with statically known spatial sizes (the batch may be dynamic).
Output: the same function with every such Resize replaced by
  * mode "linear": two MatMuls with constant interpolation matrices, `A_h @ x @ A_w^T`
    (separable bilinear interpolation; MatMul broadcasts over N and C);
  * mode "nearest": two Gathers with constant source indices along H and W.
An axis whose map is the identity gets no op. The output tensor keeps its name.

Why: onnxruntime-training 1.19 builds a ResizeGrad node but has no CPU kernel for it, so
artifacts with a Resize on the gradient path compile and then fail to load (torchvision's
segmentation heads upsample with F.interpolate). MatMul and Gather have CPU gradient kernels.

The source coordinate of every output pixel follows the ONNX Resize definition in float32,
as ORT's kernel computes it: coordinate_transformation_mode half_pixel, pytorch_half_pixel,
align_corners, asymmetric and tf_half_pixel_for_nn; nearest_mode round_prefer_floor,
round_prefer_ceil, floor and ceil. The scale of an axis is the `scales` input when given, else
output/input size; output sizes come from ONNX shape inference with data propagation (which
resolves torchvision's Shape -> Gather -> Concat size computations). A Resize this pass cannot
rewrite (cubic mode, antialias, tf_crop_and_resize, resizing N or C, unknown spatial sizes) is
left as is with a logged reason: in the frozen part it needs no gradient, and on the gradient
path the compiler's load check refuses the artifacts.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference

from .base import Plan, Stage, pass_logger
from .emitter import Emitter
from .names import NameAllocator

STAGE: Stage = "legalize"
REQUIRES: tuple[str, ...] = ()
FACTS: tuple[str, ...] = ()

_LOG = pass_logger(__name__)

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def run(graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    resizes = [node for node in graph.nodes if node.op == "Resize" and node.domain in ("", "ai.onnx", None)]
    if not resizes:
        return graph
    shapes = inferred_shapes(graph)
    names = NameAllocator(graph)
    for node in resizes:
        try:
            _rewrite(graph, names, node, shapes)
        except ValueError as reason:  # raised before the node is touched
            # Only a Resize on the gradient path needs the rewrite; in the frozen part it may stay.
            _LOG.warning("%s left as is (ORT has no CPU gradient kernel for it): %s", node.name, reason)
    return graph


def inferred_shapes(graph: gs.Graph) -> dict[str, tuple[int | None, ...]]:
    """Shapes ONNX shape inference (with data propagation) finds; None marks an unknown dim."""
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph_proto = inferred.graph
    for value in [*graph_proto.input, *graph_proto.value_info, *graph_proto.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return shapes


def _attr(node: gs.Node, name: str, default: str) -> str:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _rewrite(graph: gs.Graph, names: NameAllocator, node: gs.Node, shapes: dict) -> None:
    label = f"Resize {node.name!r}"
    mode = _attr(node, "mode", "nearest")
    coordinates = _attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest_mode = _attr(node, "nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise ValueError(f"{label}: mode {mode!r} has no differentiable rewrite; export nearest or bilinear")
    if coordinates not in COORDINATE_MODES:
        raise ValueError(f"{label}: coordinate_transformation_mode {coordinates!r} is not supported")
    if mode == "nearest" and nearest_mode not in NEAREST_MODES:
        raise ValueError(f"{label}: nearest_mode {nearest_mode!r} is not supported")
    if node.attrs.get("antialias", 0):
        raise ValueError(f"{label}: antialiased resize is not supported")
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ValueError(f"{label}: keep_aspect_ratio_policy other than 'stretch' is not supported")
    if node.attrs.get("axes") is not None:
        raise ValueError(f"{label}: the axes attribute is not supported; export the resize over all axes")
    x, y = node.inputs[0], node.outputs[0]
    in_shape, out_shape = shapes.get(x.name), shapes.get(y.name)
    if in_shape is None or len(in_shape) != 4:
        raise ValueError(f"{label}: only rank-4 (NCHW) inputs are supported (got shape {in_shape})")
    scales = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if scales is not None and scales.size == 0:
        scales = None
    if scales is not None:
        if scales.shape != (4,) or not np.all(scales[:2] == 1):
            raise ValueError(f"{label}: only the last two axes may be resized (scales {scales.tolist()})")
        spatial_in = in_shape[2:]
        if None in spatial_in:
            raise ValueError(f"{label}: its input's spatial size is unknown; export with a static input size")
        spatial_out = tuple(math.floor(size * float(scale)) for size, scale in zip(spatial_in, scales[2:], strict=True))
        axis_scales = tuple(np.float32(s) for s in scales[2:])
    else:
        if out_shape is None or len(out_shape) != 4 or None in in_shape[2:] or None in out_shape[2:]:
            raise ValueError(
                f"{label}: its input or output spatial size is unknown ({in_shape} -> {out_shape}); "
                "export with a static input size"
            )
        if None not in (in_shape[1], out_shape[1]) and in_shape[1] != out_shape[1]:
            raise ValueError(f"{label}: only the last two axes may be resized ({in_shape} -> {out_shape})")
        spatial_in, spatial_out = in_shape[2:], out_shape[2:]
        axis_scales = tuple(np.float32(o) / np.float32(i) for o, i in zip(spatial_out, spatial_in, strict=True))

    node.outputs.clear()
    emit = Emitter(graph, names, f"{node.name or y.name}/legal")
    current: gs.Tensor = x
    for axis, in_size, out_size, scale in zip((2, 3), spatial_in, spatial_out, axis_scales, strict=True):
        source = source_coordinates(out_size, in_size, scale, coordinates)
        last = axis == 3
        if mode == "linear":
            matrix = linear_matrix(source, in_size)
            if _is_identity(matrix):
                continue
            if axis == 2:
                operands = [emit.constant_node("rows", matrix), current]
            else:
                operands = [current, emit.constant_node("columns", np.ascontiguousarray(matrix.T))]
            current = emit.op("MatMul", f"interpolate_axis{axis}", operands, into=y if last else None)
        else:
            indices = nearest_indices(source, in_size, nearest_mode)
            if np.array_equal(indices, np.arange(in_size)):
                continue
            index = emit.constant_node(f"indices_axis{axis}", indices)
            current = emit.op(
                "Gather", f"gather_axis{axis}", [current, index], attrs={"axis": axis}, into=y if last else None
            )
    if current is not y:  # the width map was the identity: the last op (or the input itself) must write y
        emit.op("Identity", "same_size", [current], into=y)
    _LOG.debug("%s (%s, %s) %s -> %s", label, mode, coordinates, tuple(spatial_in), tuple(spatial_out))


def source_coordinates(out_size: int, in_size: int, scale: np.float32, mode: str) -> np.ndarray:
    """Float32 source coordinate of each output index along one axis (ONNX Resize definition)."""
    out = np.arange(out_size, dtype=np.float32)
    half = np.float32(0.5)
    if mode == "half_pixel":
        return (out + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (out + half) / scale - half if out_size > 1 else np.zeros(out_size, np.float32)
    if mode == "align_corners":
        if out_size == 1:
            return np.zeros(1, np.float32)
        return out * np.float32(in_size - 1) / np.float32(out_size - 1)
    if mode == "asymmetric":
        return out / scale
    if mode == "tf_half_pixel_for_nn":
        return (out + half) / scale
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def linear_matrix(source: np.ndarray, in_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D linear interpolation at `source`, clamped to the input's edges."""
    clamped = np.clip(source, 0, in_size - 1).astype(np.float32)
    low = np.floor(clamped).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    weight_high = clamped - low.astype(np.float32)
    matrix = np.zeros((source.size, in_size), dtype=np.float32)
    rows = np.arange(source.size)
    np.add.at(matrix, (rows, low), np.float32(1) - weight_high)
    np.add.at(matrix, (rows, high), weight_high)
    return matrix


def nearest_indices(source: np.ndarray, in_size: int, nearest_mode: str) -> np.ndarray:
    """Int64 source index of each output pixel along one axis."""
    floor = np.floor(source)
    is_half = source - floor == np.float32(0.5)
    if nearest_mode == "round_prefer_floor":
        index = np.where(is_half, floor, np.round(source))
    elif nearest_mode == "round_prefer_ceil":
        index = np.where(is_half, floor + 1, np.round(source))
    elif nearest_mode == "floor":
        index = floor
    elif nearest_mode == "ceil":
        index = np.ceil(source)
    else:
        raise ValueError(f"nearest_mode {nearest_mode!r} is not supported")
    return np.clip(index, 0, in_size - 1).astype(np.int64)


def _is_identity(matrix: np.ndarray) -> bool:
    return matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(matrix.shape[0], dtype=np.float32))


def _constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if tensor is not None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        if isinstance(value, onnx.TensorProto):
            return onnx.numpy_helper.to_array(value)
    return None
