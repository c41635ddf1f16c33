"""Saying in one line why onnxruntime failed on a compiled model.

ORT reports gradient-builder and session-creation failures as C++ assertion text with source paths
and template signatures. `explain_ort_failure` turns the known ones into one line naming the node,
its op and the reason, plus the `--train-layers` value that keeps the node out of the backward
where one exists; anything else keeps ORT's own message without the C++ decoration.
"""

from __future__ import annotations

import re

import onnx

from passes.base import Plan
from passes.names import GRADIENT_NODE_MARK, GRADIENT_SUFFIX

# What to do about an op that has no gradient here, beyond training fewer layers.
OP_REMEDIES = {
    "Resize": "export upsampling as a nearest or bilinear Resize with static scales, or as a MatMul as "
    "models/deeplab.py does",
    "Upsample": "re-export at opset >= 11, where upsampling is a Resize",
}

_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_DUPLICATE = re.compile(r"Duplicate definition of name \(([^)]*)\)")
_MISSING_OUTPUT = re.compile(r"GradientBuilderBase::O\(")
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : (.*)")
_ASSERTION = re.compile(r"\S+ was false\.\s*(.*)")


def explain_ort_failure(text: str, model: onnx.ModelProto, plan: Plan) -> str:
    """One line for an ORT failure: node, op, reason, and a way around it where there is one."""
    nodes = list(model.graph.node)
    by_name = {node.name: node for node in nodes}
    found = _NO_GRADIENT.search(text)
    if found:
        op, node_name = found.groups()
        return (
            f"node {node_name!r} ({op}) has no gradient in onnxruntime-training 1.19"
            f"{_remedy(op)}{_train_layers_hint(model, plan, _same_op(nodes, op, node_name))}"
        )
    found = _NO_KERNEL.search(text)
    if found:
        op, version, node_name = found.groups()
        forward_name = node_name.split(GRADIENT_NODE_MARK)[0].removesuffix("_Grad")
        forward_node = by_name.get(forward_name)
        if forward_node is not None and forward_name != node_name:
            return (
                f"node {forward_name!r} ({forward_node.op_type}): its gradient op {op} (node {node_name!r}) has no "
                f"CPU kernel in onnxruntime 1.19, so the training model cannot load{_remedy(forward_node.op_type)}"
                f"{_train_layers_hint(model, plan, _same_op(nodes, forward_node.op_type, forward_name))}"
            )
        return f"node {node_name!r} ({op}, opset {version}) has no CPU kernel in onnxruntime 1.19"
    found = _DUPLICATE.search(text)
    if found and found.group(1).endswith(GRADIENT_SUFFIX):
        tensor = found.group(1).removesuffix(GRADIENT_SUFFIX)
        producer = next((node for node in nodes if tensor in node.output), None)
        readers = [node for node in nodes if tensor in node.input]
        where = f" (output of {producer.op_type} node {producer.name!r})" if producer is not None else ""
        return (
            f"tensor {tensor!r}{where} is read by {len(readers)} {'/'.join(sorted({n.op_type for n in readers}))} nodes, and "
            f"onnxruntime-training 1.19's gradient builder defines its gradient {found.group(1)!r} twice (its bug "
            f"with one tensor feeding several Concats, which no --train-layers value reliably avoids)"
        )
    if _MISSING_OUTPUT.search(text):
        lacking = [
            node
            for node in nodes
            if node.op_type == "LayerNormalization" and len([name for name in node.output if name]) < 3
        ]
        if lacking:
            node = lacking[0]
            return (
                f"node {node.name!r} (LayerNormalization) lacks the optional Mean and InvStdDev outputs that "
                f"onnxruntime-training's LayerNormalization gradient reads"
                f"{_train_layers_hint(model, plan, [n.name for n in lacking])}"
            )
        return (
            "onnxruntime-training's gradient builder reads an optional output that a node in the trainable "
            f"part does not have ({_core(text)})"
        )
    return _core(text)


def _same_op(nodes: list[onnx.NodeProto], op: str, named: str) -> list[str]:
    """`named` and every other node of its op: ORT stops at the first, but each would fail the same way."""
    return [named, *(node.name for node in nodes if node.op_type == op)]


def _core(text: str) -> str:
    """ORT's message without its source path and C++ signature."""
    for pattern in (_ORT_STATUS, _ASSERTION):
        found = pattern.search(text)
        if found and found.group(1).strip():
            return found.group(1).strip()
    return text.strip()


def _remedy(op: str) -> str:
    remedy = OP_REMEDIES.get(op)
    return f"; {remedy}" if remedy else ""


def _train_layers_hint(model: onnx.ModelProto, plan: Plan, node_names: list[str]) -> str:
    """The largest --train-layers that keeps every one of `node_names` out of the backward.

    The planner trains the last N convs in graph order and every parameter from the first of them
    on, so training only the convs after the last of these nodes never differentiates them.
    """
    position = {node.name: index for index, node in enumerate(model.graph.node)}
    places = [position[name] for name in node_names if name in position]
    if not places:
        return ""
    after = sum(1 for layer in plan.convs if position.get(layer.node, -1) > max(places))
    if after == 0:
        return "; it comes after the last conv layer, so no conv can train without differentiating it"
    return f"; --train-layers {after} (or fewer) trains only the conv layers after it"
