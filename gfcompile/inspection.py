"""`gfcompile inspect`: what each layer costs in a compiled (or about to be compiled) training graph.

(Named `inspection`, not `inspect`, so that running a file from this folder cannot shadow the stdlib.)

Per layer (every Conv and Gemm, forward order): op, per-sample input and output shapes, what
happens to it (frozen, trained, gradient-filtered with r, row-tiled with K), the activation bytes
its backward keeps and its backward FLOPs, both at the compiled batch size. Those two follow the
paper's analytic definitions (`passes.geometry.filtered_cost`, as in the compile table,
times the batch): a trained conv keeps its input (filtered: the pooled input), a trained Gemm its
input row, a frozen layer nothing.

The training step's peak memory is estimated as

    parameters and constants  every checkpoint tensor plus the training graph's initializers
  + gradients                 one buffer per trainable tensor (ORT's accumulation buffers)
  + optimizer state           AdamW: 2 per trainable tensor; SGD with momentum: 1 (the runtime's
                              numpy velocity); plain SGD: 0
  + saved activations         for artifacts: measured in the training graph, the bytes of every
                              data-dependent tensor the forward part produces (or the data
                              input) that a backward node reads, ReLU masks and pooled inputs
                              included; for an uncompiled model: the analytic per-layer sum above
  + weight-derived tensors    tensors computed from parameters alone in the forward part and read
                              by the backward (gradient filtering's summed kernels W~, BN scales)
  + largest transient         the largest single node's inputs plus outputs that are neither
                              saved nor parameters (for an uncompiled model: the largest
                              forward activation, twice)

It is an estimate: ORT's allocator reuses, aligns and arenas memory, and its own workspaces
(e.g. im2col buffers) are not in the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from passes.base import ConvLayer, Plan
from passes.geometry import filtered_cost

from .config import CompileConfig
from .diff import canonical_order, checkpoint_parameters, load_onnx, read_manifest, value_types
from .errors import GfError
from .output import write_file_atomically
from .planning import conv_layers, explain_selection, select_layers, tensor_shapes
from .summary import patch_coverage_warnings

FLOAT_BYTES = 4
# ORT names every gradient tensor "<tensor>_grad"; see passes.activation_mask.
GRADIENT_SUFFIX = "_grad"


@dataclass
class LayerRow:
    name: str  # the layer's weight without ".weight" (its state_dict prefix)
    node: str
    op: str
    input_shape: list[int]  # per sample
    output_shape: list[int]
    status: str  # frozen, train, filter, tile
    r: int | None = None
    tiles: int | None = None
    vanilla_activation_bytes: int = 0
    compiled_activation_bytes: int = 0
    vanilla_backward_flops: int = 0
    compiled_backward_flops: int = 0

    @property
    def trainable(self) -> bool:
        return self.status in ("train", "filter")


@dataclass
class Inspection:
    source: str
    compiled: bool
    batch: int
    rows: list[LayerRow]
    memory: dict[str, int]  # the peak-memory estimate's terms, bytes
    notes: list[str] = field(default_factory=list)
    selection: dict[str, Any] | None = None  # for an uncompiled model: what the flags pick

    def totals(self) -> dict[str, int]:
        keys = (
            "vanilla_activation_bytes",
            "compiled_activation_bytes",
            "vanilla_backward_flops",
            "compiled_backward_flops",
        )
        return {key: sum(getattr(row, key) for row in self.rows) for key in keys}

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "compiled": self.compiled,
            "batch": self.batch,
            "layers": [{**row.__dict__, "trainable": row.trainable} for row in self.rows],
            "totals": self.totals(),
            "memory": {**self.memory, "peak_estimate": peak_bytes(self.memory)},
            "selection": self.selection,
            "notes": self.notes,
        }


MEMORY_TERMS = (
    ("parameters", "parameters and constants"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("saved_activations", "saved activations"),
    ("derived_weights", "weight-derived tensors"),
    ("largest_transient", "largest transient"),
)


def peak_bytes(memory: dict[str, int]) -> int:
    return sum(memory[key] for key, _ in MEMORY_TERMS)


def inspect_path(path: Path, config: CompileConfig | None = None) -> Inspection:
    """Inspect an artifacts folder, or plan an uncompiled .onnx model with `config`."""
    path = Path(path)
    if not path.exists():
        raise GfError(f"{path}: no such file or directory")
    if path.is_dir():
        if config is not None:
            raise GfError(f"{path}: is compiled already; layer-selection flags apply to an uncompiled .onnx model")
        return inspect_artifacts(path)
    return inspect_model(path, config or CompileConfig())


# --------------------------------------------------------------------------------------------------
# Rows


def _layer_name(weight: str) -> str:
    for suffix in (".weight.bnfolded", ".weight"):
        if weight.endswith(suffix):
            return weight[: -len(suffix)]
    return weight


def _conv_op(layer: ConvLayer) -> str:
    text = f"Conv{layer.kernel[0]}x{layer.kernel[1]}"
    if layer.strides != (1, 1):
        text += f"/s{layer.strides[0]}" if layer.strides[0] == layer.strides[1] else f"/s{layer.strides}"
    if layer.group > 1:
        text += " dw" if layer.group == layer.x_shape[1] else f" g{layer.group}"
    return text


def _conv_row(layer: ConvLayer, status: str, r: int | None, tiles: int | None, grad_x: bool) -> LayerRow:
    batch = layer.x_shape[0]
    row = LayerRow(
        name=_layer_name(layer.weight),
        node=layer.node,
        op=_conv_op(layer),
        input_shape=list(layer.x_shape[1:]),
        output_shape=list(layer.y_shape[1:]),
        status=status,
        r=r,
        tiles=tiles,
    )
    if status in ("train", "filter"):
        cost = filtered_cost(layer, r or 1, grad_x=grad_x)
        # filtered_cost is per sample; every term grows linearly with the batch.
        row.vanilla_activation_bytes = int(cost["vanilla_activation_bytes"]) * batch
        row.vanilla_backward_flops = int(cost["vanilla_backward_flops"]) * batch
        key = "filtered" if r else "vanilla"
        row.compiled_activation_bytes = int(cost[f"{key}_activation_bytes"]) * batch
        row.compiled_backward_flops = int(cost[f"{key}_backward_flops"]) * batch
    return row


def _gemm_rows(
    model: onnx.ModelProto, trainable_params: set[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, LayerRow]:
    """Gemm layers (the classifier heads) by node name."""
    rows = {}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        x_shape, w_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not x_shape or not w_shape or not y_shape or len(x_shape) != 2:
            continue
        batch, features = x_shape
        outputs = y_shape[1]
        trainable = node.input[1] in trainable_params
        row = LayerRow(
            name=_layer_name(node.input[1]),
            node=node.name,
            op="Gemm",
            input_shape=[features],
            output_shape=[outputs],
            status="train" if trainable else "frozen",
        )
        if trainable:
            row.vanilla_activation_bytes = row.compiled_activation_bytes = batch * features * FLOAT_BYTES
            # grad_W and grad_x, each one GEMM as large as the forward (a multiply-add counts 2).
            row.vanilla_backward_flops = row.compiled_backward_flops = 2 * 2 * batch * features * outputs
        rows[node.name] = row
    return rows


def _rows(
    model: onnx.ModelProto,
    plan_trainable: list[str],
    filtered: dict[str, int],
    trainable_params: set[str],
    row_tiles: int = 0,
) -> list[LayerRow]:
    layers = {layer.node: layer for layer in conv_layers(model)}
    gemms = _gemm_rows(model, trainable_params, tensor_shapes(model))
    first_trainable = plan_trainable[0] if plan_trainable else None
    # Row tiling (passes/row_tiling.py) replaces a frozen conv by one conv per band, all reading
    # the same weight: with --row-tiles, a weight read by several convs is one tiled layer.
    bands: dict[str, list[ConvLayer]] = {}
    for layer in layers.values():
        bands.setdefault(layer.weight, []).append(layer)
    rows = []
    for node in model.graph.node:
        if node.name in layers:
            layer = layers[node.name]
            group = bands[layer.weight]
            if row_tiles >= 2 and len(group) > 1 and node.name not in plan_trainable:
                if node.name == group[0].node:
                    rows.append(_tiled_row(group))
                continue
            status = "filter" if node.name in filtered else "train" if node.name in plan_trainable else "frozen"
            # Backprop stops at the first trainable conv: it needs no input gradient.
            rows.append(_conv_row(layer, status, filtered.get(node.name), None, node.name != first_trainable))
        elif node.name in gemms:
            rows.append(gemms[node.name])
    return rows


def _tiled_row(group: list[ConvLayer]) -> LayerRow:
    """One row for the K band convs of a row-tiled layer, with the shapes of its tallest band.

    (The bands' rows overlap by halos the pass recomputes, so the layer's full shapes cannot be
    summed back from them.)
    """
    tallest = max(group, key=lambda layer: layer.x_shape[2])
    return _conv_row(tallest, "tile", None, len(group), grad_x=False)


# --------------------------------------------------------------------------------------------------
# Compiled artifacts


def inspect_artifacts(directory: Path) -> Inspection:
    manifest = read_manifest(directory)
    for name in ("eval_model.onnx", "training_model.onnx"):
        if not (directory / name).is_file():
            raise GfError(f"{directory}: {name} is missing")
    plan = manifest.plan
    trainable_params = set(plan.trainable_params)
    eval_model = with_recorded_shapes(load_onnx(directory / "eval_model.onnx"), manifest.shapes or {})
    # The plan records the tiles actually applied (--memory-budget picks them; config only has what was asked).
    rows = _rows(eval_model, list(plan.trainable_convs), plan.filtered, trainable_params, plan.row_tiles)
    batch = manifest.batch_size

    parameters, arrays = (
        checkpoint_parameters(directory / "checkpoint") if (directory / "checkpoint").exists() else ({}, {})
    )
    training = load_onnx(directory / "training_model.onnx")
    saved, derived, transient = _measured_activations(training, set(parameters))
    constants = sum(_initializer_bytes(init) for init in training.graph.initializer)
    parameter_bytes = sum(int(a.nbytes) for a in arrays.values())
    trainable_bytes = sum(int(arrays[name].nbytes) for name in trainable_params if name in arrays)
    optimizer = manifest.optimizer
    memory = {
        "parameters": parameter_bytes + constants,
        "gradients": trainable_bytes,
        "optimizer_state": trainable_bytes * _optimizer_slots(optimizer.type, optimizer.momentum),
        "saved_activations": saved,
        "derived_weights": derived,
        "largest_transient": transient,
    }
    notes = []
    if not plan.row_tiles:  # band convs of a tiled compile are not the layers the plan counted
        layers = conv_layers(eval_model)
        compiled_plan = Plan(convs=layers, trainable_convs=list(plan.trainable_convs), filtered=dict(plan.filtered))
        notes += branch_notes(eval_model, compiled_plan)
    if not parameters:
        notes.append("no checkpoint: parameters, gradients and optimizer state are not counted")
    analytic = sum(row.compiled_activation_bytes for row in rows)
    notes.append(
        f"saved activations are measured in training_model.onnx ({_bytes(saved)}); the per-layer "
        f"analytic sum is {_bytes(analytic)} (the graph also keeps ReLU masks, BN inputs and the loss's inputs)"
    )
    return Inspection(str(directory), True, batch, rows, memory, notes)


def layer_shapes_to_record(eval_model: onnx.ModelProto, *measured: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes, taken from the models the compiler measured, of the layer tensors (Conv and
    Gemm inputs and outputs) that `eval_model` leaves without one: what `inspect` needs to read back."""
    known = tensor_shapes(eval_model)
    sources: dict[str, tuple[int, ...]] = {}
    for model in measured:
        sources.update({name: dims for name, dims in tensor_shapes(model).items() if dims and min(dims) >= 1})
    recorded = {}
    for node in eval_model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            for name in (node.input[0], node.output[0]):
                dims = known.get(name)
                if (not dims or min(dims) < 1) and name in sources:
                    recorded[name] = list(sources[name])
    return recorded


def with_recorded_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """`model` with the manifest's recorded shapes as value_info (replacing symbolic ones), in place."""
    if not shapes:
        return model
    kept = [value for value in model.graph.value_info if value.name not in shapes]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for name, dims in shapes.items():
        model.graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(dims)))
    return model


def _optimizer_slots(kind: str | None, momentum: float | None) -> int:
    if kind == "adamw":
        return 2
    if kind == "sgd":
        return 1 if momentum else 0
    return 0


def _initializer_bytes(init: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return int(math.prod(init.dims)) * itemsize


def _type_bytes(type_proto: onnx.TypeProto | None) -> int:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return 0
    tensor = type_proto.tensor_type
    if not tensor.elem_type or not tensor.HasField("shape"):
        return 0
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    if any(d <= 0 for d in dims):
        return 0
    return int(math.prod(dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize


def backward_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of nodes that transitively read a gradient tensor: the backward part of a training graph."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    names = {name for node in graph.node for name in node.output} | {value.name for value in graph.input}
    frontier = [name for name in names if name.endswith(GRADIENT_SUFFIX)]
    backward: set[int] = set()
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for index in readers.get(name, []):
            if index not in backward:
                backward.add(index)
                frontier.extend(graph.node[index].output)
    return backward


def _measured_activations(training: onnx.ModelProto, parameters: set[str]) -> tuple[int, int, int]:
    """Bytes the backward keeps from the forward: (activations, weight-derived tensors, largest transient).

    Activations depend on the data; weight-derived tensors (gradient filtering's summed kernels W~, a
    BN scale) depend only on parameters and constants. The transient is the largest single node's
    inputs plus outputs that are none of those and not parameters.
    """
    graph = training.graph
    types = value_types(training)
    for name in {n for node in graph.node for n in node.output if n.endswith(GRADIENT_SUFFIX)}:
        # ORT's gradient ops (ConvGrad, ...) leave their outputs untyped; a gradient has its tensor's type.
        source = name[: -len(GRADIENT_SUFFIX)]
        if name not in types and source in types:
            types[name] = types[source]
    backward = backward_nodes(graph)
    initializers = {init.name for init in graph.initializer}
    # Parameters, ORT's gradient accumulation buffers (the ".out" outputs alias them) and its reset flag.
    interface = [*graph.input, *graph.output]
    state = parameters | {v.name for v in interface if "_grad.accumulation" in v.name or v.name == "lazy_reset_grad"}
    data_inputs = {v.name for v in graph.input} - state - initializers
    data_dependent = set(data_inputs)
    forward_made: set[str] = set()
    for index in canonical_order(graph):  # producers before readers
        node = graph.node[index]
        if index in backward:
            continue
        outputs = [name for name in node.output if name]
        forward_made.update(outputs)
        if any(name in data_dependent for name in node.input):
            data_dependent.update(outputs)
    kept = {
        name
        for index in backward
        for name in graph.node[index].input
        if name and (name in forward_made or name in data_inputs)
    }
    activations = sum(_type_bytes(types.get(name)) for name in kept if name in data_dependent)
    derived = sum(_type_bytes(types.get(name)) for name in kept if name not in data_dependent)
    transient = 0
    for node in graph.node:
        working = {name for name in [*node.input, *node.output] if name}
        working -= kept | state | initializers
        transient = max(transient, sum(_type_bytes(types.get(name)) for name in working))
    return activations, derived, transient


# --------------------------------------------------------------------------------------------------
# An uncompiled model: what the flags would pick


def inspect_model(path: Path, config: CompileConfig) -> Inspection:
    from .loading import load_and_validate, pin_shapes
    from .passrunner import run_passes
    from .pipeline import LEGALIZE_PASSES  # here, not at the top: the pipeline imports this module

    # The same legalized graph the compile plans on: legalizing can reorder branches, and "last N" is graph order.
    legal = run_passes(LEGALIZE_PASSES, load_and_validate(path), None, stage="legalize")
    model = pin_shapes(legal, config)
    plan = select_layers(model, config)
    trainable_params = set(plan.trainable_params)
    # Which chains row tiling would cut is decided inside the pass; before compiling nothing shows as tiled.
    rows = _rows(model, plan.trainable_convs, plan.filtered, trainable_params)
    initializers = {init.name: init for init in model.graph.initializer}
    data_input = next(value for value in model.graph.input if value.name not in initializers)
    batch = int(data_input.type.tensor_type.shape.dim[0].dim_value)
    parameter_bytes = sum(_initializer_bytes(init) for init in initializers.values())
    trainable_bytes = sum(_initializer_bytes(initializers[name]) for name in trainable_params if name in initializers)
    largest = max((_type_bytes(v.type) for v in [*model.graph.value_info, *model.graph.output]), default=0)
    memory = {
        "parameters": parameter_bytes,
        "gradients": trainable_bytes,
        "optimizer_state": trainable_bytes * _optimizer_slots(config.optimizer, config.momentum),
        "saved_activations": sum(row.compiled_activation_bytes for row in rows),
        "derived_weights": 0,
        "largest_transient": 2 * largest,
    }
    selection = {
        "filter_layers": config.filter_layers,
        "train_layers": config.resolved_train_layers(),
        "trainable_convs": [_layer_name(plan.conv(name).weight) for name in plan.trainable_convs],
        "filtered": {_layer_name(plan.conv(name).weight): r for name, r in plan.filtered.items()},
        "trainable_params": plan.trainable_params,
    }
    notes = [
        "not compiled yet: saved activations are the per-layer analytic sum (the compiled graph also "
        "keeps ReLU masks and BN inputs); compile and inspect the artifacts for a measured figure",
        *branch_notes(model, plan),
    ]
    return Inspection(str(path), False, batch, rows, memory, notes, selection)


def branch_notes(model: onnx.ModelProto, plan: Plan) -> list[str]:
    """On multi-branch nets "the last N convs" (graph order) can leave a conv frozen whose output
    flows into the trained part (a parallel branch or skip); one note per such conv, with the reason."""
    return [
        f"last {len(plan.trainable_convs)} (graph order) leaves {_layer_name(plan.conv(choice.conv).weight)} "
        f"frozen: {choice.reason}"
        for choice in explain_selection(model, plan)
        if choice.status == "frozen" and "parallel to the trained part" in choice.reason
    ]


# --------------------------------------------------------------------------------------------------
# Output


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def _status(row: LayerRow) -> str:
    if row.status == "filter":
        return f"filter r={row.r}"
    if row.status == "tile":
        return f"tile K={row.tiles}"
    return row.status


def format_text(result: Inspection) -> str:
    lines = []
    if result.selection is not None:
        sel = result.selection
        lines.append(
            f"{result.source}: not compiled; --filter-layers {sel['filter_layers']} --train-layers "
            f"{sel['train_layers']} would train {len(sel['trainable_convs'])} convs "
            f"({len(sel['trainable_params'])} parameter tensors):"
        )
        for name in sel["trainable_convs"]:
            r = sel["filtered"].get(name)
            lines.append(f"  {name}" + (f"  (gradient filter r={r})" if r else "  (exact backprop)"))
        lines.append("")
    header = (
        f"{'#':>3} {'layer':<30} {'op':<13} {'input':<12} {'output':<12} {'status':<11} "
        f"{'saved act':>10} {'(vanilla)':>10} {'bwd MFLOP':>10} {'(vanilla)':>10}"
    )
    lines += [f"batch {result.batch}; shapes per sample (C x H x W)", header, "-" * len(header)]
    for index, row in enumerate(result.rows):
        if row.trainable:
            numbers = (
                f"{_bytes(row.compiled_activation_bytes):>10} {_bytes(row.vanilla_activation_bytes):>10} "
                f"{row.compiled_backward_flops / 1e6:>10.2f} {row.vanilla_backward_flops / 1e6:>10.2f}"
            )
        else:
            numbers = f"{'-':>10} {'-':>10} {'-':>10} {'-':>10}"
        band = "*" if row.status == "tile" else ""
        lines.append(
            f"{index:>3} {row.name[-30:]:<30} {row.op:<13} {_shape(row.input_shape) + band:<12} "
            f"{_shape(row.output_shape) + band:<12} {_status(row):<11} {numbers}"
        )
    total = result.totals()
    trained = sum(row.trainable for row in result.rows)
    lines.append("-" * len(header))
    lines.append(
        f"{'':>3} {f'total ({trained} of {len(result.rows)} layers train)':<72} "
        f"{_bytes(total['compiled_activation_bytes']):>10} {_bytes(total['vanilla_activation_bytes']):>10} "
        f"{total['compiled_backward_flops'] / 1e6:>10.2f} {total['vanilla_backward_flops'] / 1e6:>10.2f}"
    )
    if total["compiled_activation_bytes"] and total["compiled_backward_flops"]:
        lines.append(
            f"saved activations {total['vanilla_activation_bytes'] / total['compiled_activation_bytes']:.1f}x smaller, "
            f"backward FLOPs {total['vanilla_backward_flops'] / total['compiled_backward_flops']:.1f}x fewer than vanilla backprop"
        )
    if any(row.status == "tile" for row in result.rows):
        lines.append("* row-tiled layer (tile K = bands): shapes of its tallest band")
    lines += patch_coverage_warnings((row.name, row.r, row.output_shape) for row in result.rows)
    lines.append("")
    lines.append(f"estimated peak memory of one training step (batch {result.batch}):")
    for key, label in MEMORY_TERMS:
        lines.append(f"  {label:<26} {_bytes(result.memory[key]):>10}")
    lines.append(f"  {'= peak (estimate)':<26} {_bytes(peak_bytes(result.memory)):>10}")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def plot(result: Inspection, path: Path) -> Path:
    """Bar chart of each trainable layer's saved activations, vanilla backprop vs compiled."""
    try:
        import matplotlib
    except ImportError:
        raise GfError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display on CI machines or devices
    from matplotlib import pyplot as plt

    rows = [row for row in result.rows if row.trainable]
    if not rows:
        raise GfError("no layer trains, so there is nothing to plot")
    positions = np.arange(len(rows))
    width = 0.4
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
    axes.bar(positions - width / 2, [r.vanilla_activation_bytes / 1024 for r in rows], width, label="vanilla backprop")
    axes.bar(positions + width / 2, [r.compiled_activation_bytes / 1024 for r in rows], width, label="compiled")
    axes.set_xticks(positions, [f"{r.name}\n{_status(r)}" for r in rows], rotation=45, ha="right", fontsize=8)
    axes.set_ylabel(f"saved activations (KiB, batch {result.batch})")
    total = result.totals()
    axes.set_title(
        f"{Path(result.source).name}: {_bytes(total['vanilla_activation_bytes'])} -> "
        f"{_bytes(total['compiled_activation_bytes'])}"
    )
    axes.legend()
    figure.tight_layout()
    try:
        # Rendered beside `path` and renamed: a full disk or read-only folder is one line, with no half PNG.
        return write_file_atomically(Path(path), lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    finally:
        plt.close(figure)
