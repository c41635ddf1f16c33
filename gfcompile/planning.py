"""Deciding what happens to each layer: the Plan that every pass reads.

`select_layers` picks the last N convs in graph order, their patch sizes and the parameters
that train; `explain_selection` says per conv why it was picked or not (for `inspect`);
`untrained_initializers` lists float initializers of the trained part that are neither
trained nor frozen for a stated reason, which the pipeline reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from passes.base import ConvLayer, Plan
from passes.geometry import explicit_pads
from passes.parameters import (
    BN_STATISTICS_INPUTS,
    PARAMETER_INPUTS,
    VIEW_OPS,
    parameter_slots,
)

from .config import CompileConfig
from .errors import GfError


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
        try:
            pads = explicit_pads(attrs.get("auto_pad"), attrs.get("pads"), x_shape[2:], kernel, strides, dilations)
        except ValueError as exc:
            raise GfError(f"conv {node.name!r}: {exc}") from None
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
    patch_sizes, fitted = _fit_patch_sizes(filtered, config)
    unknown = set(config.patch_size_map) - {key for layer in filtered for key in _patch_size_keys(layer)}
    if unknown:
        raise GfError(f"--patch-size-map names layers that are not filtered: {sorted(unknown)}")

    nodes = list(model.graph.node)
    first_trainable = next(i for i, node in enumerate(nodes) if node.name == trainable[0].node)
    initializers = {init.name: init for init in model.graph.initializer}
    sources = view_sources(model)
    trainable_params: list[str] = []
    frozen_params: list[str] = []
    trainable_bns = {layer.bn for layer in trainable if layer.bn}
    for position, node in enumerate(nodes):
        slots = parameter_slots(node.op_type)
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
            if slot >= len(node.input):
                continue
            # A weight may reach its op through views (convnext: Linear weight -> Transpose -> MatMul).
            name = sources.get(node.input[slot], node.input[slot])
            if name not in initializers or initializers[name].data_type != onnx.TensorProto.FLOAT:
                continue
            target = trainable_params if in_trainable_part else frozen_params
            if name not in trainable_params and name not in frozen_params:
                target.append(name)
    return Plan(
        convs=layers,
        trainable_convs=[layer.node for layer in trainable],
        filtered=patch_sizes,
        fitted_patch_sizes=fitted,
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


def _fit_patch_sizes(filtered: list[ConvLayer], config: CompileConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Patch size r of each filtered conv, and the convs whose r was lowered to fit their output.

    The global --patch-size shrinks to the largest r that fits a small output map (the 1x1 maps of
    squeeze-excitation convs get r=1: an exact backward, so they leave the filtered set). An r the
    user gave a layer in --patch-size-map is taken as asked, and refused if it does not fit.
    """
    patch_sizes: dict[str, int] = {}
    fitted: dict[str, int] = {}
    for layer in filtered:
        explicit = _explicit_patch_size(layer, config)
        r = explicit if explicit is not None else config.patch_size
        if r < 1:
            raise GfError(f"patch size must be >= 1, got {r} for conv {layer.node!r}")
        largest = max(layer.y_shape[2:])
        if r > largest and explicit is not None:
            raise GfError(
                f"patch size {r} (set for this layer in --patch-size-map) is larger than conv {layer.node!r}'s "
                f"output {layer.y_shape[2]}x{layer.y_shape[3]}; give it at most {largest}"
            )
        if r > largest:
            fitted[layer.node] = r = largest
        if r > 1 or explicit is not None:
            patch_sizes[layer.node] = r
    return patch_sizes, fitted


def _explicit_patch_size(layer: ConvLayer, config: CompileConfig) -> int | None:
    for key in _patch_size_keys(layer):
        if key in config.patch_size_map:
            return int(config.patch_size_map[key])
    return None


def _patch_size_keys(layer: ConvLayer) -> tuple[str, str, str]:
    return (layer.node, layer.weight, layer.weight.rsplit(".", 1)[0])


def view_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the initializer it views, for outputs of chains of VIEW_OPS that start at an initializer."""
    initializers = {init.name for init in model.graph.initializer}
    sources: dict[str, str] = {}
    for node in model.graph.node:  # graph order is topological: a chain's head is seen first
        if node.op_type not in VIEW_OPS or not node.input or not node.output:
            continue
        head = node.input[0]
        origin = head if head in initializers else sources.get(head)
        if origin is not None:
            sources[node.output[0]] = origin
    return sources


@dataclass(frozen=True)
class LayerChoice:
    """One conv's part in the plan, and why (see `explain_selection`)."""

    conv: str
    index: int  # position among the convs, in graph order
    status: str  # "frozen", "trained (exact)" or "filtered (r=...)"
    reason: str


def explain_selection(model: onnx.ModelProto, plan: Plan) -> list[LayerChoice]:
    """Why each conv trains, is filtered or stays frozen under `plan`.

    "Last N" counts convs in the graph's node order (a topological order). On multi-branch
    nets that order interleaves branches, so "last N" can leave a conv of the last block frozen
    beside trained ones; the reason then says so and where that branch joins the trained part.
    """
    trainable = set(plan.trainable_convs)
    count, n_train = len(plan.convs), len(plan.trainable_convs)
    first_trained = min((layer.index for layer in plan.convs if layer.node in trainable), default=count)
    beside = _parallel_branches(model, trainable)
    choices = []
    for layer in plan.convs:
        from_end = count - layer.index
        if layer.node in trainable:
            filtered = layer.node in plan.filtered
            status = f"filtered (r={plan.filtered[layer.node]})" if filtered else "trained (exact)"
            reason = f"#{from_end} from the end in graph order, within the last {n_train}"
            fitted = plan.fitted_patch_sizes.get(layer.node)
            if fitted is not None:
                reason += f"; output {layer.y_shape[2]}x{layer.y_shape[3]} is smaller than the patch size, " + (
                    "so r=1: exact backward" if fitted == 1 else f"so r={fitted}, the largest that fits"
                )
        else:
            status = "frozen"
            reason = (
                f"#{from_end} from the end in graph order, before the first trained conv (#{count - first_trained})"
            )
            if layer.node in beside:
                reason += (
                    f"; a branch parallel to the trained part (the first trained conv does not depend on it), "
                    f"joining it at {beside[layer.node]!r}"
                )
        choices.append(LayerChoice(layer.node, layer.index, status, reason))
    return choices


def _parallel_branches(model: onnx.ModelProto, trainable: set[str]) -> dict[str, str]:
    """Frozen conv beside the trained part -> the node where its output joins it.

    A frozen conv that the first trained conv does not depend on sits in a branch parallel to
    the trained part (inception's first branch, when "last N" took the block's other branches);
    it joins the trained part at the first node after the first trained conv that reads its
    output through non-conv ops. Frozen convs upstream of the trained part are not listed.
    """
    nodes = list(model.graph.node)
    position = {node.name: index for index, node in enumerate(nodes)}
    start = min((position[name] for name in trainable if name in position), default=len(nodes))
    producers = {output: node for node in nodes for output in node.output}
    upstream: set[str] = set()
    frontier = list(nodes[start].input) if start < len(nodes) else []
    while frontier:
        producer = producers.get(frontier.pop())
        if producer is not None and producer.name not in upstream:
            upstream.add(producer.name)
            frontier.extend(producer.input)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, str] = {}
    for node in nodes[:start]:
        if node.op_type != "Conv" or node.name in upstream:
            continue
        frontier, seen, joins = list(node.output), set(), []
        while frontier:
            tensor = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for reader in consumers.get(tensor, []):
                if position[reader.name] > start:
                    joins.append(reader)
                elif reader.op_type != "Conv":
                    frontier.extend(reader.output)
        if joins:
            found[node.name] = min(joins, key=lambda reader: position[reader.name]).name
    return found


def untrained_initializers(model: onnx.ModelProto, plan: Plan) -> list[str]:
    """Float initializers read in the trained part that neither train nor are frozen for a reason.

    The trained part is every node from the first trained conv on, in graph order. Trained:
    `plan.trainable_params`. Frozen for a reason: BatchNormalization running statistics, and
    parameters of frozen layers (`plan.frozen_params`). What remains is, e.g., a scale that a
    model multiplies in with Mul (ConvNeXt's layer_scale): it keeps its value, and the user
    should hear about it. Constants that legalize passes emit are Constant nodes, not initializers.
    """
    nodes = list(model.graph.node)
    if not plan.trainable_convs:
        return []
    names = [node.name for node in nodes]
    first = names.index(plan.trainable_convs[0]) if plan.trainable_convs[0] in names else 0
    initializers = {init.name: init for init in model.graph.initializer}
    sources = view_sources(model)
    accounted = set(plan.trainable_params) | set(plan.frozen_params)
    unexplained: list[str] = []
    for node in nodes[first:]:
        if node.op_type in VIEW_OPS:
            continue
        for tensor in node.input:
            name = sources.get(tensor, tensor)
            init = initializers.get(name)
            if init is None or init.data_type != onnx.TensorProto.FLOAT or name in accounted or name in unexplained:
                continue
            unexplained.append(name)
    return unexplained


def reused_parameters(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Float initializers that several nodes read directly as the same kind of layer parameter.

    The exporter's deduplication of equal initializers goes through Identity aliases, which
    untie_parameters materialises silently. A tensor that several layers read directly is
    different: the PyTorch model applied one module more than once. Untying gives each use its own
    copy, so the compiled model trains the uses separately where PyTorch would train one tensor;
    the pipeline says so instead of doing it silently. Keyed by tensor, valued by reader nodes.
    """
    floats = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for slot in PARAMETER_INPUTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot] in floats:
                readers.setdefault(node.input[slot], []).append(node.name or node.op_type)
    return {name: nodes for name, nodes in readers.items() if len(nodes) > 1}
