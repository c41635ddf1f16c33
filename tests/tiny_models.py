"""Tiny ONNX CNNs built with onnx.helper, for tests that need many small, fast models.

Every model is input (N, C, H, W) -> convs -> [extra op] -> ... -> GlobalAveragePool -> Flatten -> Gemm,
so it compiles in about a second with cross-entropy and any optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    kernel: int = 3
    stride: int = 1
    pad: int = 1
    dilation: int = 1
    group: int = 1
    relu: bool = True


@dataclass
class _Builder:
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    opsets: dict = field(default_factory=lambda: {"": OPSET})

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_out(size: int, spec: ConvSpec) -> int:
    return (size + 2 * spec.pad - spec.dilation * (spec.kernel - 1) - 1) // spec.stride + 1


def tiny_cnn(
    convs: list[ConvSpec] | None = None,
    input_shape: tuple[int, int, int] = (3, 16, 16),
    batch: int | str = "N",
    classes: int = 5,
    extra: str | None = None,
    extra_after: int = 0,
    seed: int = 0,
) -> onnx.ModelProto:
    """A CNN of `convs`; `extra` ("If", "Loop", "LSTM", "Contrib", "Custom") is inserted after conv `extra_after`.

    The extra op keeps the tensor's shape and is not constant-foldable (If's condition is computed),
    so it survives into the compiled graph.
    """
    convs = convs if convs is not None else [ConvSpec(8), ConvSpec(8, stride=2), ConvSpec(8)]
    b = _Builder(np.random.default_rng(seed))
    channels, height, width = input_shape
    current = "x"
    for index, spec in enumerate(convs):
        name = f"conv{index + 1}"
        fan_in = channels // spec.group * spec.kernel**2
        weight = b.rng.standard_normal((spec.out_channels, channels // spec.group, spec.kernel, spec.kernel))
        b.const(f"{name}.weight", (weight / np.sqrt(fan_in)).astype(np.float32))
        b.const(f"{name}.bias", (0.1 * b.rng.standard_normal(spec.out_channels)).astype(np.float32))
        b.node(
            "Conv",
            [current, f"{name}.weight", f"{name}.bias"],
            [f"{name}_out"],
            name,
            kernel_shape=[spec.kernel] * 2,
            strides=[spec.stride] * 2,
            pads=[spec.pad] * 4,
            dilations=[spec.dilation] * 2,
            group=spec.group,
        )
        channels, height, width = spec.out_channels, conv_out(height, spec), conv_out(width, spec)
        current = f"{name}_out"
        if extra is not None and index == extra_after:
            current = _extra(b, extra, current, (channels, height, width), f"extra_{extra.lower()}")
        if spec.relu:
            b.node("Relu", [current], [f"relu{index + 1}"], f"relu{index + 1}")
            current = f"relu{index + 1}"
    b.node("GlobalAveragePool", [current], ["pooled"], "pool")
    b.node("Flatten", ["pooled"], ["flat"], "flatten")
    b.const("fc.weight", (b.rng.standard_normal((classes, channels)) / np.sqrt(channels)).astype(np.float32))
    b.const("fc.bias", np.zeros(classes, np.float32))
    b.node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], "fc", transB=1)
    graph = helper.make_graph(
        b.nodes, "tiny_cnn", [_value("x", [batch, *input_shape])], [_value("logits", [batch, classes])], b.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in b.opsets.items()])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _extra(b: _Builder, kind: str, inp: str, chw: tuple[int, int, int], tag: str) -> str:
    """Append one shape-preserving `kind` node (or small group) reading `inp`; returns its output name."""
    out = f"{tag}_out"
    channels, height, width = chw
    if kind == "If":
        # A computed condition: a constant one would be folded away by the cleanup pass.
        b.node("ReduceSum", [inp], [f"{tag}_sum"], f"{tag}_sum", keepdims=0)
        b.node("Greater", [f"{tag}_sum", b.const(f"{tag}_threshold", np.float32(-1e30))], [f"{tag}_cond"], f"{tag}_gt")
        then = helper.make_graph([helper.make_node("Identity", [inp], [f"{tag}_then"])], "then", [], [])
        otherwise = helper.make_graph([helper.make_node("Neg", [inp], [f"{tag}_else"])], "else", [], [])
        then.output.append(helper.make_tensor_value_info(f"{tag}_then", TensorProto.FLOAT, None))
        otherwise.output.append(helper.make_tensor_value_info(f"{tag}_else", TensorProto.FLOAT, None))
        b.node("If", [f"{tag}_cond"], [out], tag, then_branch=then, else_branch=otherwise)
    elif kind == "Loop":
        half = b.const(f"{tag}_half", np.float32(0.5))
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Mul", ["value_in", half], ["value_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("value_in", TensorProto.FLOAT, None),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("value_out", TensorProto.FLOAT, None),
            ],
        )
        trips = b.const(f"{tag}_trips", np.int64(2))
        b.node("Loop", [trips, b.const(f"{tag}_cond", np.bool_(True)), inp], [out], tag, body=body)
    elif kind == "LSTM":
        # (N, C, H, W) -> sequence (H*W, N, C) -> LSTM with hidden size C -> back to (N, C, H, W).
        b.node("Reshape", [inp, b.const(f"{tag}_flat_shape", np.array([0, channels, -1]))], [f"{tag}_ncl"], f"{tag}_r1")
        b.node("Transpose", [f"{tag}_ncl"], [f"{tag}_lnc"], f"{tag}_t1", perm=[2, 0, 1])
        w = (0.3 * b.rng.standard_normal((1, 4 * channels, channels))).astype(np.float32)
        r = (0.3 * b.rng.standard_normal((1, 4 * channels, channels))).astype(np.float32)
        b.node(
            "LSTM",
            [f"{tag}_lnc", b.const(f"{tag}_W", w), b.const(f"{tag}_R", r)],
            [f"{tag}_y"],
            tag,
            hidden_size=channels,
        )
        b.node("Squeeze", [f"{tag}_y", b.const(f"{tag}_axis", np.array([1]))], [f"{tag}_lnh"], f"{tag}_sq")
        b.node("Transpose", [f"{tag}_lnh"], [f"{tag}_nhl"], f"{tag}_t2", perm=[1, 2, 0])
        b.node(
            "Reshape",
            [f"{tag}_nhl", b.const(f"{tag}_shape", np.array([0, channels, height, width]))],
            [out],
            f"{tag}_r2",
        )
    elif kind == "Contrib":
        b.opsets["com.microsoft"] = 1
        b.node("Gelu", [inp], [out], tag, domain="com.microsoft")
    elif kind == "Custom":
        b.opsets["com.example"] = 1
        b.node("MyRelu", [inp], [out], tag, domain="com.example")
    else:
        raise ValueError(f"unknown extra op {kind!r}")
    return out


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
