"""Deciding what happens to each layer: the Plan that every pass reads."""

from __future__ import annotations

import math

import onnx
from onnx import helper

from passes.base import ConvLayer, Plan

from .config import CompileConfig
from .errors import GfError

# Initializer inputs (by position) that are learnable parameters of an op.
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
BN_STATISTICS_INPUTS = (3, 4)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor that shape inference could type."""
    shapes: dict[str, tuple[int, ...]] = {}
    graph = model.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
            shapes[value.name] = dims
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def conv_layers(model: onnx.ModelProto) -> list[ConvLayer]:
    """Every Conv node, in graph order, with its static geometry."""
    shapes = tensor_shapes(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        x_shape, w_shape = shapes.get(node.input[0]), shapes.get(node.input[1])
        y_shape = shapes.get(node.output[0])
        if w_shape is None:
            raise GfError(f"conv {node.name!r}: its weight is not an initializer; only static weights can train")
        if x_shape is None or y_shape is None or len(x_shape) != 4 or min(x_shape + y_shape) < 1:
            raise GfError(f"conv {node.name!r}: only 2-D convs with static NCHW shapes are supported (got {x_shape})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = tuple(attrs.get("kernel_shape", w_shape[2:]))
        strides = tuple(attrs.get("strides", (1, 1)))
        dilations = tuple(attrs.get("dilations", (1, 1)))
        pads = _explicit_pads(attrs, x_shape, kernel, strides, dilations, node.name)
        followers = consumers.get(node.output[0], [])
        bn = followers[0].name if len(followers) == 1 and followers[0].op_type == "BatchNormalization" else None
        layers.append(
            ConvLayer(
                node=node.name,
                index=len(layers),
                input=node.input[0],
                output=node.output[0],
                weight=node.input[1],
                bias=node.input[2] if len(node.input) > 2 and node.input[2] else None,
                x_shape=tuple(x_shape),
                y_shape=tuple(y_shape),
                kernel=(int(kernel[0]), int(kernel[1])),
                strides=(int(strides[0]), int(strides[1])),
                pads=tuple(int(p) for p in pads),
                dilations=(int(dilations[0]), int(dilations[1])),
                group=int(attrs.get("group", 1)),
                bn=bn,
            )
        )
    return layers


def _explicit_pads(attrs, x_shape, kernel, strides, dilations, name) -> tuple[int, int, int, int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        return tuple(attrs.get("pads", (0, 0, 0, 0)))
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise GfError(f"conv {name!r}: unknown auto_pad {auto_pad!r}")
    begins, ends = [], []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations, strict=True):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return (begins[0], begins[1], ends[0], ends[1])


def select_layers(model: onnx.ModelProto, config: CompileConfig) -> Plan:
    """Pick the trainable and filtered convs (counted from the output) and the parameters to train."""
    layers = conv_layers(model)
    if not layers:
        raise GfError("the model has no Conv layers; gfcompile compiles CNNs")
    n_train = config.resolved_train_layers()
    n_filter = config.filter_layers
    count = len(layers)
    if n_filter < 0 or n_filter > count:
        raise GfError(f"--filter-layers {n_filter} is out of range: the model has {count} conv layers")
    if n_train < 1 or n_train > count:
        default = "" if config.train_layers is not None else " (the default)"
        raise GfError(
            f"--train-layers {n_train}{default} is out of range: the model has {count} conv layers; "
            f"give --train-layers 1..{count}"
        )
    if config.row_tiles == 1 or config.row_tiles < 0:
        raise GfError(f"--row-tiles must be 0 (off) or >= 2, got {config.row_tiles}")
    if config.row_tiles and config.memory_budget_mb is not None:
        raise GfError("give either --row-tiles or --memory-budget, not both")
    if n_train < n_filter:
        raise GfError(f"--train-layers {n_train} is smaller than --filter-layers {n_filter}; filtered layers train")

    trainable = layers[count - n_train :]
    filtered = layers[count - n_filter :] if n_filter else []
    patch_sizes = {layer.node: _patch_size(layer, config) for layer in filtered}
    for layer in filtered:
        r = patch_sizes[layer.node]
        if r < 1:
            raise GfError(f"patch size must be >= 1, got {r} for conv {layer.node!r}")
        if r > max(layer.y_shape[2:]):
            raise GfError(
                f"patch size {r} is larger than conv {layer.node!r}'s output "
                f"{layer.y_shape[2]}x{layer.y_shape[3]}; use a smaller --patch-size, or give this layer "
                f"its own r with --patch-size-map (keys: conv node or weight names, e.g. {layer.weight!r})"
            )
    unknown = set(config.patch_size_map) - {
        key for layer in filtered for key in (layer.node, layer.weight, layer.weight.rsplit(".", 1)[0])
    }
    if unknown:
        raise GfError(f"--patch-size-map names layers that are not filtered: {sorted(unknown)}")

    nodes = list(model.graph.node)
    first_trainable = next(i for i, node in enumerate(nodes) if node.name == trainable[0].node)
    initializers = {init.name: init for init in model.graph.initializer}
    trainable_params: list[str] = []
    frozen_params: list[str] = []
    trainable_bns = {layer.bn for layer in trainable if layer.bn}
    for position, node in enumerate(nodes):
        slots = PARAMETER_INPUTS.get(node.op_type, ())
        if node.op_type == "BatchNormalization":
            # BN follows its conv's fate (unless --bn-mode frozen); its running statistics never train.
            frozen_params += [node.input[i] for i in BN_STATISTICS_INPUTS if node.input[i] in initializers]
            in_trainable_part = config.bn_mode != "frozen" and (
                node.name in trainable_bns
                or (position > first_trainable and not _follows_frozen_conv(node, layers, trainable))
            )
        else:
            in_trainable_part = position >= first_trainable
        for slot in slots:
            if slot < len(node.input) and node.input[slot] in initializers:
                name = node.input[slot]
                if initializers[name].data_type != onnx.TensorProto.FLOAT:
                    continue
                target = trainable_params if in_trainable_part else frozen_params
                if name not in trainable_params and name not in frozen_params:
                    target.append(name)
    return Plan(
        convs=layers,
        trainable_convs=[layer.node for layer in trainable],
        filtered=patch_sizes,
        trainable_params=trainable_params,
        frozen_params=frozen_params,
        bn_mode=config.bn_mode,
        paper_stride_scaling=config.paper_stride_scaling,
        row_tiles=config.row_tiles,
        row_strategy=config.row_strategy,
        row_tile_trainable=config.row_tile_trainable,
    )


def _follows_frozen_conv(bn_node: onnx.NodeProto, layers: list[ConvLayer], trainable: list[ConvLayer]) -> bool:
    trainable_names = {layer.node for layer in trainable}
    return any(layer.bn == bn_node.name and layer.node not in trainable_names for layer in layers)


def _patch_size(layer: ConvLayer, config: CompileConfig) -> int:
    for key in (layer.node, layer.weight, layer.weight.rsplit(".", 1)[0]):
        if key in config.patch_size_map:
            return int(config.patch_size_map[key])
    return config.patch_size
