"""Loading, validating and shape-pinning the user's ONNX model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from onnx import helper, shape_inference
from onnx.external_data_helper import ExternalDataInfo

from .config import DEFAULT_BATCH_SIZE, CompileConfig
from .errors import GfError

# What onnxruntime-training 1.19.2 accepts.
MAX_IR_VERSION = 10
MAX_OPSET = 21
# Opset 22 only added bfloat16 to the type constraints of existing ops (onnx PR 6099), so a model
# without bfloat16 means the same at opset 21; the full checker then confirms it node by node.
RELABEL_OPSETS = {22}
# protobuf cannot serialise one message over 2 GiB; bigger models are checked from their path.
PROTOBUF_LIMIT = 2**31 - 1
MESSAGE_LIMIT = 300


def load_and_validate(model_path: Path, downconvert: bool = False) -> onnx.ModelProto:
    """Load an ONNX file and check it is something ORT's training build can take.

    With `downconvert`, an IR version or opset newer than ORT 1.19 accepts is lowered where that is
    exact; otherwise the error says how to convert the file.
    """
    path = Path(model_path)
    _check_readable_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise GfError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {one_line(exc)})") from None
    if not model.graph.node:
        raise GfError(f"{path}: not an ONNX model (the graph has no nodes)")
    bad_text = _invalid_text_field(model)
    if bad_text is not None:
        raise GfError(f"{path}: corrupted ONNX model (its {bad_text} field is not valid UTF-8 text)")
    _load_external_data(model, path)
    lowered = _check_versions(model, path, downconvert)
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            # After lowering, the full check (strict type inference) verifies every node at the new opset.
            onnx.checker.check_model(model, full_check=lowered)
        else:
            onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:  # ValidationError, InferenceError, and ValueError/RuntimeError for malformed protos
        raise GfError(f"{path}: fails the ONNX checker: {one_line(exc)}") from None
    return model


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, shortened: checker messages span several lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _invalid_text_field(message) -> str | None:
    """The name of the first string field that is not valid UTF-8, or None.

    proto2 does not validate strings when parsing, and protobuf's upb backend hands such a field
    to Python as bytes; graph tools then fail on it far from the cause.
    """
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if _repeated(field) else [value]
            if any(not isinstance(item, str) for item in values):
                return field.name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if _repeated(field) else [value]:
                found = _invalid_text_field(item)
                if found is not None:
                    return found
    return None


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated and deprecates label; older releases only have label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise GfError(f"{path}: no such file")
    if path.is_dir():
        raise GfError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():
        raise GfError(f"{path}: not a regular file, expected an .onnx file")
    if path.stat().st_size == 0:
        raise GfError(f"{path}: file is empty")
    if not os.access(path, os.R_OK):
        raise GfError(f"{path}: permission denied")


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, subgraphs included: any of them may hold external data."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every external-data reference before reading it, so a missing or hostile location is one line."""
    base = path.resolve().parent
    external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    for tensor in external:
        try:
            info = ExternalDataInfo(tensor)
        except Exception as exc:
            raise GfError(f"{path}: tensor {tensor.name!r} has a malformed external-data entry ({exc})") from None
        location = info.location or ""
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base not in target.parents:
            raise GfError(
                f"{path}: tensor {tensor.name!r} points at external data {location!r} outside the model's folder"
            )
        if not target.is_file():
            raise GfError(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is missing "
                f"(expected at {target}); copy the data file next to the model"
            )
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise GfError(
                f"{path}: external data file {location!r} is {target.stat().st_size} bytes, but tensor "
                f"{tensor.name!r} needs bytes up to {end} (truncated copy?)"
            )
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise GfError(f"{path}: cannot read its external data ({one_line(exc)})") from None


def _check_versions(model: onnx.ModelProto, path: Path, downconvert: bool) -> bool:
    """Refuse versions ORT 1.19 cannot load; with `downconvert`, lower the ones that can be lowered exactly."""
    lowered = False
    if model.ir_version > MAX_IR_VERSION:
        if not downconvert:
            raise GfError(
                f"{path}: ONNX IR version {model.ir_version} is newer than onnxruntime-training 1.19 accepts "
                f"(<= {MAX_IR_VERSION}); pass --downconvert to relabel it as IR {MAX_IR_VERSION} (the checker "
                "then refuses anything newer), or re-export with onnx==1.16.2"
            )
        model.ir_version = MAX_IR_VERSION
        lowered = True
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx") or opset.version <= MAX_OPSET:
            continue
        convert = (
            'python -c "import onnx; from onnx import version_converter as vc; '
            f"onnx.save(vc.convert_version(onnx.load('{path}'), {MAX_OPSET}), '{path.with_suffix('')}-opset{MAX_OPSET}.onnx')\""
        )
        if opset.version not in RELABEL_OPSETS:
            raise GfError(
                f"{path}: opset {opset.version} is newer than onnxruntime-training 1.19 supports (<= {MAX_OPSET}), "
                f"and onnx {onnx.__version__}'s version_converter only knows opsets <= {onnx.defs.onnx_opset_version()}; "
                f"re-export with opset {MAX_OPSET} or lower, or convert it where a newer onnx is installed: {convert}"
            )
        if not downconvert:
            raise GfError(
                f"{path}: opset {opset.version} is newer than onnxruntime-training 1.19 supports (<= {MAX_OPSET}); "
                f"pass --downconvert to lower it to opset {MAX_OPSET} (opset {opset.version} only added bfloat16 "
                "types, and the checker verifies every node at the lower opset)"
            )
        opset.version = MAX_OPSET
        lowered = True
    return lowered


def pin_shapes(model: onnx.ModelProto, config: CompileConfig) -> onnx.ModelProto:
    """Make every graph input dim static: ORT's pooling gradients crash on symbolic dims.

    The batch dim (dim 0) takes `--batch-size` (or 32 when the model leaves it dynamic,
    reported by the caller). Other dims must be static in the model or come from
    `--input-shape`. Tensors that ONNX shape inference cannot type (outputs of Loop or of
    contrib ops in the frozen part) are measured by running the model once in onnxruntime.
    """
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    initializer_names = {init.name for init in pinned.graph.initializer}
    data_inputs = [value for value in pinned.graph.input if value.name not in initializer_names]
    if not data_inputs:
        raise GfError("the model has no data input")
    symbol_values: dict[str, int] = {}
    rebatched: list[str] = []
    for value in data_inputs:
        if not value.type.HasField("tensor_type"):
            raise GfError(f"input {value.name!r} is not a tensor; gfcompile compiles CNNs with tensor inputs")
        dims = value.type.tensor_type.shape.dim
        wanted = _wanted_dims(value.name, dims, config)
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 and dims[0].dim_value != wanted[0]:
            rebatched.append(f"input {value.name!r} was exported with a fixed batch of {dims[0].dim_value}")
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
        inferred = shape_inference.infer_shapes(pinned, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        hint = ""
        if rebatched:
            # Exporters bake a fixed batch into Reshape/Gemm shapes, so only re-exporting helps.
            hint = (
                f"; {', '.join(rebatched)} and --batch-size asks for {config.batch_size}: re-export it with a "
                "dynamic batch axis (torch.onnx.export(..., dynamic_axes={'<input>': {0: 'batch'}})) "
                "or compile with that batch size"
            )
        raise GfError(f"shape inference failed with the pinned input shapes: {one_line(exc)}{hint}") from None
    missing = _untyped_outputs(inferred)
    if missing:
        _measure_shapes(inferred, missing)
    return inferred


def _static_shapes(model: onnx.ModelProto) -> set[str]:
    typed = set()
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            typed.add(value.name)
    return typed


def _untyped_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Node outputs (top-level graph) without a static shape, each with the node that makes it."""
    typed = _static_shapes(model)
    typed |= {init.name for init in model.graph.initializer}
    return {name: node for node in model.graph.node for name in node.output if name and name not in typed}


def _measure_shapes(model: onnx.ModelProto, missing: dict[str, onnx.NodeProto]) -> None:
    """Record the shapes onnxruntime computes for `missing` tensors as value_info, in place.

    Shapes are measured on an all-zeros input of the pinned shape; a model whose shapes depend
    on its input values has no static shape to train with anyway.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing if name not in known)
    initializer_names = {init.name for init in probe.graph.initializer}
    feeds = {}
    for value in probe.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = np.zeros([d.dim_value for d in tensor_type.shape.dim], dtype=dtype)
    first_name, first_node = next(iter(missing.items()))
    where = f"{first_name!r} (output of {_op_label(first_node)} node {first_node.name!r})"
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        values = dict(zip(names, session.run(None, feeds), strict=True))
    except Exception as exc:
        unknown = [n for n in probe.graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")]
        if unknown and "not a registered function/op" in str(exc):
            raise GfError(
                f"node {unknown[0].name!r} ({_op_label(unknown[0])}) is a custom-domain op that onnxruntime has no "
                "kernel for, so onnxruntime-training can neither run nor train the model; replace the op"
            ) from None
        raise GfError(
            f"ONNX shape inference cannot give tensor {where} a static shape, and onnxruntime cannot run the "
            f"model to measure it ({one_line(exc)})"
        ) from None
    for name in missing:
        array = values.get(name)
        if not isinstance(array, np.ndarray):
            raise GfError(f"tensor {where} has no static tensor shape; gfcompile needs static shapes")
        model.graph.value_info.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
        )


def _op_label(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _batch_size(config: CompileConfig, model_batch: int | None) -> int:
    if config.batch_size is not None:
        if config.batch_size < 1:
            raise GfError(f"--batch-size must be >= 1, got {config.batch_size}")
        return config.batch_size
    return model_batch if model_batch is not None else DEFAULT_BATCH_SIZE


def _wanted_dims(name: str, dims, config: CompileConfig) -> list[int]:
    static = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in dims]
    if not static:
        raise GfError(
            f"input {name!r} has no shape; ORT's pooling gradients need static shapes, so give it with "
            "--input-shape C,H,W (and --batch-size)"
        )
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
            f"so give them with --input-shape C,H,W (the model has {','.join(str(s or '?') for s in static[1:])}; "
            "--batch-size sets the batch dim)"
        )
    return wanted
