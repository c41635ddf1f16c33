"""Loading, validating and shape-pinning the user's ONNX model."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import shape_inference

from .config import DEFAULT_BATCH_SIZE, CompileConfig
from .errors import GfError

# What onnxruntime-training 1.19.2 accepts.
MAX_IR_VERSION = 10
MAX_OPSET = 21


def load_and_validate(model_path: Path) -> onnx.ModelProto:
    """Load an ONNX file and check it is something ORT's training build can take."""
    path = Path(model_path)
    if not path.exists():
        raise GfError(f"{path}: no such file")
    if path.is_dir():
        raise GfError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise GfError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise GfError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise GfError(f"{path}: not an ONNX model (the graph has no nodes)")
    if model.ir_version > MAX_IR_VERSION:
        raise GfError(
            f"{path}: ONNX IR version {model.ir_version} is newer than onnxruntime-training 1.19 accepts "
            f"(<= {MAX_IR_VERSION}); re-export with onnx==1.16.2"
        )
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            raise GfError(
                f"{path}: opset {opset.version} is newer than onnxruntime-training 1.19 supports "
                f"(<= {MAX_OPSET}); re-export with a lower opset or convert with onnx.version_converter"
            )
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise GfError(f"{path}: fails the ONNX checker: {first_line}") from None
    return model


def pin_shapes(model: onnx.ModelProto, config: CompileConfig) -> onnx.ModelProto:
    """Make every graph input dim static: ORT's pooling gradients crash on symbolic dims.

    The batch dim (dim 0) takes `--batch-size` (or 32 when the model leaves it dynamic,
    reported by the caller). Other dims must be static in the model or come from
    `--input-shape`.
    """
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    initializer_names = {init.name for init in pinned.graph.initializer}
    data_inputs = [value for value in pinned.graph.input if value.name not in initializer_names]
    if not data_inputs:
        raise GfError("the model has no data input")
    symbol_values: dict[str, int] = {}
    for value in data_inputs:
        dims = value.type.tensor_type.shape.dim
        wanted = _wanted_dims(value.name, dims, config)
        for dim, size in zip(dims, wanted, strict=True):
            if dim.HasField("dim_param"):
                symbol_values[dim.dim_param] = size
            dim.Clear()
            dim.dim_value = size
    for value in pinned.graph.output:
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param in symbol_values:
                size = symbol_values[dim.dim_param]
                dim.Clear()
                dim.dim_value = size
            elif index == 0 and not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = _batch_size(config, None)
    del pinned.graph.value_info[:]
    try:
        return shape_inference.infer_shapes(pinned, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise GfError(f"shape inference failed with the pinned input shapes: {exc}") from None


def _batch_size(config: CompileConfig, model_batch: int | None) -> int:
    if config.batch_size is not None:
        if config.batch_size < 1:
            raise GfError(f"--batch-size must be >= 1, got {config.batch_size}")
        return config.batch_size
    return model_batch if model_batch is not None else DEFAULT_BATCH_SIZE


def _wanted_dims(name: str, dims, config: CompileConfig) -> list[int]:
    static = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in dims]
    if not static:
        raise GfError(f"input {name!r} has no shape; give --input-shape")
    if config.input_shape is not None:
        requested = list(config.input_shape)
        if len(requested) == len(static) - 1:
            requested = [_batch_size(config, static[0]), *requested]
        if len(requested) != len(static):
            raise GfError(
                f"--input-shape {tuple(config.input_shape)} does not match input {name!r} of rank {len(static)}"
            )
        if any(size < 1 for size in requested):
            raise GfError(f"--input-shape must be positive, got {tuple(config.input_shape)}")
        for axis, (have, want) in enumerate(zip(static, requested, strict=True)):
            if axis > 0 and have is not None and have != want:
                raise GfError(f"--input-shape asks for dim {axis} = {want} but input {name!r} has {have}")
        return requested
    wanted = [_batch_size(config, static[0]), *static[1:]]
    missing = [axis for axis, size in enumerate(wanted) if size is None]
    if missing:
        raise GfError(
            f"input {name!r} has dynamic dims {missing}; ORT's pooling gradients need static shapes, "
            "so give them with --input-shape C,H,W"
        )
    return wanted
