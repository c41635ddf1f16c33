"""Splitting a forward graph where it leaves the frozen prefix, for the runtime's feature cache.

The frozen prefix is every node that reads the data input, directly or through other prefix
nodes, and no trainable parameter: with BatchNorm in eval mode (frozen BNs are folded by then)
and no random op, its output for a sample is the same at every step, so the runtime computes
it once per sample (runtime/feature_cache.py). The cut is the set of prefix tensors that the
rest of the graph (the tail) reads; a residual branch that crosses the cut makes it several
tensors, and the tail then takes them all as inputs.

Two models come out, both built from the forward graph after the forward passes (so row tiling
of the prefix is kept, and the tail is compiled by the same backward, training and lowering
passes as the whole graph, so gradient filtering applies to it alike):

- the prefix: data input -> cut tensors, an inference model;
- the tail forward: cut tensors -> the model's outputs, with the trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from passes.base import Plan

from .errors import GfError

PREFIX_MODEL = "prefix_model.onnx"
TAIL_DIRECTORY = "feature_tail"
# Ops whose output differs from call to call: a prefix holding one cannot be cached exactly.
RANDOM_OPS = {
    "Dropout",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


@dataclass
class PrefixSplit:
    prefix: onnx.ModelProto
    tail: onnx.ModelProto
    cut: list[str]  # the cut tensors, in the order the prefix outputs them and the tail takes them


def split_frozen_prefix(forward: onnx.ModelProto, plan: Plan) -> PrefixSplit:
    """The prefix and tail of `forward` (shapes pinned), or a GfError saying why it cannot be cached."""
    inferred = onnx.shape_inference.infer_shapes(forward)
    graph = inferred.graph
    initializers = {init.name for init in graph.initializer}
    data_inputs = [value.name for value in graph.input if value.name not in initializers]
    prefix_nodes = _prefix_nodes(graph, data_inputs, set(plan.trainable_params))
    if not prefix_nodes:
        raise GfError("--feature-cache: the first layer trains, so there is no frozen prefix to cache")
    _check_deterministic(prefix_nodes)
    prefix_outputs = {name for node in prefix_nodes for name in node.output} | set(data_inputs)
    prefix_ids = {id(node) for node in prefix_nodes}
    cut: list[str] = []
    for node in graph.node:
        if id(node) in prefix_ids:
            continue
        for name in node.input:
            if name in prefix_outputs and name not in cut:
                cut.append(name)
    for output in graph.output:
        if output.name in prefix_outputs:
            raise GfError(
                f"--feature-cache: the model output {output.name!r} does not depend on any trained layer; "
                "nothing after the frozen prefix trains it"
            )
    typed = {value.name: value for value in [*graph.value_info, *graph.input]}
    missing = [name for name in cut if not _static(typed.get(name))]
    if missing:
        raise GfError(f"--feature-cache: the cut tensor {missing[0]!r} has no static shape; cannot size the cache")
    cut_values = [typed[name] for name in cut]
    prefix = _extract(inferred, [typed[name] for name in data_inputs], cut_values, "frozen_prefix")
    tail = _extract(inferred, cut_values, list(graph.output), "trained_tail")
    return PrefixSplit(prefix=prefix, tail=tail, cut=cut)


def _prefix_nodes(graph: onnx.GraphProto, data_inputs: list[str], trainable: set[str]) -> list[onnx.NodeProto]:
    """Nodes (in graph order, which is topological) reading the data and no trainable parameter, transitively."""
    from_data, from_trainable = set(data_inputs), set(trainable)
    prefix = []
    for node in graph.node:
        if any(name in from_trainable for name in node.input):
            from_trainable.update(node.output)
        elif any(name in from_data for name in node.input):
            from_data.update(node.output)
            prefix.append(node)
    return prefix


def _check_deterministic(nodes: list[onnx.NodeProto]) -> None:
    for node in nodes:
        if node.op_type in RANDOM_OPS:
            raise GfError(
                f"--feature-cache: the frozen prefix holds {node.op_type} node {node.name!r}, whose output is "
                "random at every step; its features cannot be cached exactly"
            )
        if node.op_type == "BatchNormalization" and (
            len(node.output) > 1 or any(a.name == "training_mode" and a.i for a in node.attribute)
        ):
            raise GfError(
                f"--feature-cache: BatchNormalization {node.name!r} in the frozen prefix uses batch statistics, "
                "so a sample's features depend on its batch; they cannot be cached"
            )


def _static(value: onnx.ValueInfoProto | None) -> bool:
    if value is None or not value.type.HasField("tensor_type"):
        return False
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and all(dim.HasField("dim_value") and dim.dim_value >= 1 for dim in dims)


def _extract(
    model: onnx.ModelProto,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    name: str,
) -> onnx.ModelProto:
    """The nodes computing `outputs` from `inputs` (and initializers), as a model of their own."""
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    boundary = {value.name for value in inputs}
    needed: set[int] = set()
    pending = [value.name for value in outputs]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor in boundary:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending.extend(node.input)
    nodes = [node for node in graph.node if id(node) in needed]
    read = {name for node in nodes for name in node.input} | {value.name for value in outputs}
    initializers = [init for init in graph.initializer if init.name in read and init.name not in boundary]
    produced = {name for node in nodes for name in node.output}
    value_info = [value for value in graph.value_info if value.name in produced]
    extracted = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs, initializers, value_info=value_info),
        opset_imports=list(model.opset_import),
    )
    extracted.ir_version = model.ir_version
    extracted.metadata_props.extend(model.metadata_props)
    return extracted
