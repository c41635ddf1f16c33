"""Portable artifacts: a pure-function training step in standard ONNX ops, for plain onnxruntime.

`train_step.onnx` computes one optimizer step as a function, with no state inside the runtime:

    (data, labels, trainable parameters, optimizer state, step, learning_rate)
        -> (loss, model outputs, updated parameters, updated optimizer state, gradient_sq_norm)

It is the lowered training graph (the `lower` passes have replaced every onnxruntime-training op;
the accumulators carry each parameter's gradient) followed by the optimizer written in standard
ops. `step` is the number of steps already taken (int64 scalar); `gradient_sq_norm` is the sum of
the squared gradients, which is finite exactly when every gradient is, so the runtime can refuse a
non-finite step from one scalar.

The optimizer updates each large tensor on its own and all small ones (biases, BN affines) laid
end to end as one flat vector; its state is one tensor per group and kind ("<group>/exp_avg",
"<group>/exp_avg_sq", or "<group>/momentum"), listed in the manifest's `portable.groups`.

- AdamW with PyTorch's semantics, as onnxruntime-training's AdamWOptimizer in mode 0 (the mode
  `backward._use_torch_adamw_semantics` selects; its betas and eps are read from that node):
      p <- p - lr*wd*p;  m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g*g
      p <- p - lr*m / ((1 - b1^t) * (sqrt(v / (1 - b2^t)) + eps)),   t = step + 1
- SGD as the runtime's momentum SGD: g <- g + wd*p;  v <- momentum*v + g (v starts at 0);  p <- p - lr*v.

Frozen parameters become initializers stored once, in `frozen_params.bin` (ONNX external data),
which `train_step.onnx` and `eval_step.onnx` (the eval model with the same split) both reference.
The initial checkpoint holds the parameters only: optimizer state starts at zero (the runtime
creates it). `inference_template.onnx` is the inference model with every weight inline; the manifest records
the byte range of each trainable weight in it, so the runtime writes a trained inference model by
patching bytes, without the onnx package.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from passes.lowering import gradient_output_name
from runtime.manifest import PortableGroupSpec, PortableParameterSpec, PortableSpec, PortableStateSpec
from runtime.safetensors_io import write_safetensors

from .backward import TrainingModels
from .config import CompileConfig
from .errors import GfError

TRAIN_STEP_FILE = "train_step.onnx"
EVAL_STEP_FILE = "eval_step.onnx"
INFERENCE_TEMPLATE_FILE = "inference_template.onnx"
FROZEN_DATA_FILE = "frozen_params.bin"
CHECKPOINT_FILE = "portable_checkpoint.safetensors"
STEP_INPUT = "optimizer/step"
LR_INPUT = "optimizer/learning_rate"
GRADIENT_NORM_OUTPUT = "optimizer/gradient_sq_norm"
_EXTERNAL_ALIGNMENT = 64
# Trainable tensors smaller than this (elements) share one flat optimizer update (see _optimizer_groups).
_SMALL_TENSOR = 65536


@dataclass
class PortableModels:
    train_step: onnx.ModelProto
    eval_step: onnx.ModelProto
    inference: onnx.ModelProto
    frozen: dict[str, np.ndarray]
    initial_state: dict[str, np.ndarray]
    spec: PortableSpec


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX shape inference's value_info (the lowerings need the forward's shapes)."""
    return onnx.shape_inference.infer_shapes(model)


def first_nonstandard_op(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The first node outside standard ONNX (a contrib or training op), or None."""
    return next(
        (node for node in model.graph.node if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type)),
        None,
    )


def check_standard_ops(model: onnx.ModelProto) -> None:
    """Refuse, in one line, a graph that still has an op outside standard ONNX after lowering."""
    node = first_nonstandard_op(model)
    if node is not None:
        raise GfError(
            f"no lowering to standard ONNX for {node.domain or 'ai.onnx'}::{node.op_type} (node {node.name!r})"
        )


def checkpoint_values(checkpoint: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The initial values of `names` from onnxruntime-training's compiled checkpoint."""
    from runtime.ort_training import training_api

    state = training_api().CheckpointState.load_checkpoint(str(checkpoint))
    return {name: np.array(state.parameters[name].data) for name in names if name in state.parameters}


def build_portable(
    lowered: onnx.ModelProto, train: TrainingModels, trainable: list[str], config: CompileConfig
) -> PortableModels:
    """The portable models from the lowered training graph (see the module docstring)."""
    check_standard_ops(lowered)
    data_names = [v.name for v in train.model_inputs] + [train.label_name]
    parameter_names = [v.name for v in lowered.graph.input if v.name not in data_names]
    values = checkpoint_values(train.checkpoint, parameter_names + [v.name for v in train.eval.graph.input])
    missing = [name for name in parameter_names if name not in values]
    if missing:
        raise GfError(f"internal error: training graph inputs {missing[:3]} are neither data nor parameters")
    frozen = {name: value for name, value in values.items() if name not in trainable}
    optimizer = _optimizer_settings(train, config)

    step_model = onnx.ModelProto()
    step_model.CopyFrom(lowered)
    graph = step_model.graph
    _freeze_inputs(graph, frozen)
    initial_state, parameters, groups = _append_optimizer(graph, trainable, values, optimizer)
    del step_model.opset_import[:]
    step_model.opset_import.extend(o for o in lowered.opset_import if o.domain in ("", "ai.onnx"))

    eval_model = onnx.ModelProto()
    eval_model.CopyFrom(train.eval)
    _freeze_inputs(eval_model.graph, {k: v for k, v in frozen.items() if k in {i.name for i in eval_model.graph.input}})

    inference = _inference_model(train, values)
    spec = PortableSpec(
        train_step=TRAIN_STEP_FILE,
        eval_step=EVAL_STEP_FILE,
        inference_template=INFERENCE_TEMPLATE_FILE,
        frozen_data=FROZEN_DATA_FILE,
        checkpoint=CHECKPOINT_FILE,
        data_inputs=tuple(v.name for v in train.model_inputs if v.name != train.label_name),
        label_input=train.label_name,
        loss_output=train.training.graph.output[0].name,
        model_outputs=tuple(v.name for v in train.model_outputs),
        step_input=STEP_INPUT,
        lr_input=LR_INPUT,
        gradient_norm_output=GRADIENT_NORM_OUTPUT,
        parameters=tuple(parameters),
        groups=tuple(groups),
        optimizer=optimizer,
        inference_patches={},
    )
    return PortableModels(step_model, eval_model, inference, frozen, initial_state, spec)


def _optimizer_settings(train: TrainingModels, config: CompileConfig) -> dict:
    if config.optimizer == "adamw":
        node = next(n for n in train.optimizer.graph.node if n.op_type == "AdamWOptimizer")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("adam_mode", 0) != 0 or attrs.get("correct_bias", 1) != 1:
            raise GfError("internal error: the portable step implements AdamW mode 0 with bias correction only")
        return {
            "type": "adamw",
            "beta1": float(attrs.get("alpha", 0.9)),
            "beta2": float(attrs.get("beta", 0.999)),
            "epsilon": float(attrs.get("epsilon", 1e-8)),
            "weight_decay": float(attrs.get("weight_decay", 0.0)),
        }
    return {"type": "sgd", "momentum": float(config.momentum), "weight_decay": float(config.weight_decay)}


def _freeze_inputs(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> None:
    """Graph inputs in `values` become initializers (their data goes to the shared external file)."""
    kept = [v for v in graph.input if v.name not in values]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in values.items())


class _Builder:
    """Nodes of the optimizer, named "optimizer/<parameter>/<what>" (a scope no ORT tensor uses)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.taken = {t for n in graph.node for t in (*n.input, *n.output)} | {v.name for v in graph.input}
        self.taken |= {i.name for i in graph.initializer}

    def name(self, name: str) -> str:
        if name in self.taken:
            raise GfError(f"internal error: the train step's tensor name {name!r} is already used by the model")
        self.taken.add(name)
        return name

    def const(self, name: str, value) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), self.name(name)))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.graph.node.append(helper.make_node(op_type, inputs, [self.name(output)], name=output, **attrs))
        return output


def _append_optimizer(
    graph: onnx.GraphProto, trainable: list[str], values: dict[str, np.ndarray], optimizer: dict
) -> tuple[dict[str, np.ndarray], list[PortableParameterSpec], list[PortableGroupSpec]]:
    b = _Builder(graph)
    grads = {p: gradient_output_name(p) for p in trainable}
    returned = [o for o in graph.output if o.name not in set(grads.values())]
    missing = [p for p, g in grads.items() if g not in {o.name for o in graph.output}]
    if missing:
        raise GfError(f"internal error: no gradient output for trainable parameters {missing[:3]}")
    del graph.output[:]
    graph.output.extend(returned)
    graph.input.append(helper.make_tensor_value_info(b.name(STEP_INPUT), TensorProto.INT64, []))
    graph.input.append(helper.make_tensor_value_info(b.name(LR_INPUT), TensorProto.FLOAT, []))
    constants = _optimizer_constants(b, optimizer)
    groups, norms = [], []
    for index, members in enumerate(_optimizer_groups(trainable, values)):
        groups.append(_update_group(b, f"optimizer/group{index}", members, grads, values, optimizer, constants))
        norms.append(f"optimizer/group{index}/grad_sq_sum")
    norm = norms[0] if len(norms) == 1 else b.op("Sum", norms, "optimizer/grad_sq_sum")
    graph.node.append(helper.make_node("Identity", [norm], [b.name(GRADIENT_NORM_OUTPUT)], name=GRADIENT_NORM_OUTPUT))
    graph.output.append(helper.make_tensor_value_info(GRADIENT_NORM_OUTPUT, TensorProto.FLOAT, []))
    parameters = [PortableParameterSpec(name=p, input=p, output=f"updated/{p}") for p in trainable]
    return {p: values[p] for p in trainable}, parameters, groups


def _optimizer_groups(trainable: list[str], values: dict[str, np.ndarray]) -> list[list[str]]:
    """Each large tensor alone; all small ones laid end to end in one group.

    Elementwise ops on a tiny tensor cost more in dispatch than in arithmetic (EfficientNet-B0's
    per-tensor update was 188 kernels, 90% of its step), while concatenating large tensors costs
    memory (ResNet-18's flat update: 1.17x the training build's peak).
    """
    small = [p for p in trainable if values[p].size < _SMALL_TENSOR]
    return [[p] for p in trainable if p not in small] + ([small] if small else [])


def _optimizer_constants(b: _Builder, optimizer: dict) -> dict[str, str]:
    lr = LR_INPUT
    c = {"lr": lr, "wd": b.const("optimizer/weight_decay", np.float32(optimizer["weight_decay"]))}
    if optimizer["type"] == "adamw":
        one = b.const("optimizer/one", np.float32(1))
        t_int = b.op("Add", [STEP_INPUT, b.const("optimizer/one_i64", np.int64(1))], "optimizer/t_i64")
        t = b.op("Cast", [t_int], "optimizer/t", to=TensorProto.FLOAT)
        beta1, beta2 = np.float32(optimizer["beta1"]), np.float32(optimizer["beta2"])
        c["b1"], c["b2"] = b.const("optimizer/beta1", beta1), b.const("optimizer/beta2", beta2)
        c["bias1"] = b.op("Sub", [one, b.op("Pow", [c["b1"], t], "optimizer/beta1_t")], "optimizer/bias1")
        c["bias2"] = b.op("Sub", [one, b.op("Pow", [c["b2"], t], "optimizer/beta2_t")], "optimizer/bias2")
        c["1-b1"] = b.const("optimizer/one_minus_beta1", np.float32(1) - beta1)
        c["1-b2"] = b.const("optimizer/one_minus_beta2", np.float32(1) - beta2)
        c["eps"] = b.const("optimizer/epsilon", np.float32(optimizer["epsilon"]))
        c["lr_wd"] = b.op("Mul", [lr, c["wd"]], "optimizer/lr_wd")
    else:
        c["momentum"] = b.const("optimizer/momentum_factor", np.float32(optimizer["momentum"]))
    return c


def _update_group(
    b: _Builder,
    tag: str,
    members: list[str],
    grads: dict[str, str],
    values: dict[str, np.ndarray],
    optimizer: dict,
    c: dict[str, str],
) -> PortableGroupSpec:
    """The optimizer update of `members` (one tensor, or several laid end to end); their state is one
    tensor per kind, named "<tag>/exp_avg" etc."""
    graph = b.graph
    flat = len(members) > 1
    sizes = [int(values[p].size) for p in members]
    shape = [sum(sizes)] if flat else list(values[members[0]].shape)
    if flat:
        flat_shape = b.const(f"{tag}/flat_shape", np.array([-1], np.int64))
        g = b.op(
            "Concat",
            [b.op("Reshape", [grads[p], flat_shape], f"{tag}/{p}/grad") for p in members],
            f"{tag}/grad",
            axis=0,
        )
        p_all = b.op(
            "Concat", [b.op("Reshape", [p, flat_shape], f"{tag}/{p}/flat") for p in members], f"{tag}/params", axis=0
        )
    else:
        g, p_all = grads[members[0]], members[0]
    b.op("ReduceSumSquare", [g], f"{tag}/grad_sq_sum", keepdims=0)

    kinds = ["exp_avg", "exp_avg_sq"] if optimizer["type"] == "adamw" else ["momentum"]
    if optimizer["type"] == "sgd" and optimizer["momentum"] == 0:
        kinds = []
    states = [PortableStateSpec(name=k, input=f"{tag}/{k}", output=f"updated/{tag}/{k}") for k in kinds]
    for state in states:
        graph.input.append(helper.make_tensor_value_info(b.name(state.input), TensorProto.FLOAT, shape))
        graph.output.append(helper.make_tensor_value_info(state.output, TensorProto.FLOAT, shape))
    updated = f"{tag}/params_updated" if flat else f"updated/{members[0]}"
    if optimizer["type"] == "adamw":
        m, v = states[0].input, states[1].input
        decayed = p_all
        if optimizer["weight_decay"]:
            decayed = b.op("Sub", [p_all, b.op("Mul", [p_all, c["lr_wd"]], f"{tag}/decay")], f"{tag}/decayed")
        m_old, m_grad = b.op("Mul", [c["b1"], m], f"{tag}/m_old"), b.op("Mul", [c["1-b1"], g], f"{tag}/m_grad")
        m_new = b.op("Add", [m_old, m_grad], states[0].output)
        g2 = b.op("Mul", [b.op("Mul", [c["1-b2"], g], f"{tag}/v_grad1"), g], f"{tag}/v_grad")
        v_new = b.op("Add", [b.op("Mul", [c["b2"], v], f"{tag}/v_old"), g2], states[1].output)
        root = b.op("Sqrt", [b.op("Div", [v_new, c["bias2"]], f"{tag}/v_hat")], f"{tag}/v_root")
        denom = b.op("Mul", [c["bias1"], b.op("Add", [root, c["eps"]], f"{tag}/denom_eps")], f"{tag}/denom")
        step = b.op("Div", [b.op("Mul", [c["lr"], m_new], f"{tag}/lr_m"), denom], f"{tag}/update")
        b.op("Sub", [decayed, step], updated)
    else:
        direction = g
        if optimizer["weight_decay"]:
            direction = b.op("Add", [g, b.op("Mul", [c["wd"], p_all], f"{tag}/decay")], f"{tag}/decayed_grad")
        if states:
            velocity = b.op("Mul", [c["momentum"], states[0].input], f"{tag}/v_old")
            direction = b.op("Add", [velocity, direction], states[0].output)
        b.op("Sub", [p_all, b.op("Mul", [c["lr"], direction], f"{tag}/update")], updated)

    if flat:
        pieces = [f"{tag}/{p}/updated_flat" for p in members]
        split = b.const(f"{tag}/sizes", np.array(sizes, np.int64))
        graph.node.append(
            helper.make_node("Split", [updated, split], [b.name(n) for n in pieces], name=f"{tag}/split", axis=0)
        )
        for p, piece in zip(members, pieces, strict=True):
            b.op("Reshape", [piece, b.const(f"{tag}/{p}/shape", np.array(values[p].shape, np.int64))], f"updated/{p}")
    for p in members:
        graph.output.append(helper.make_tensor_value_info(f"updated/{p}", TensorProto.FLOAT, list(values[p].shape)))
    return PortableGroupSpec(parameters=tuple(members), state=tuple(states))


def _inference_model(train: TrainingModels, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The eval model without the loss and labels, every weight inline."""
    graph = gs.import_onnx(train.eval)
    tensors = graph.tensors()
    graph.outputs = [tensors[v.name] for v in train.model_outputs]
    graph.inputs = [
        t for t in graph.inputs if t.name in {v.name for v in train.model_inputs} and t.name != train.label_name
    ]
    for name, value in values.items():
        if name in tensors and isinstance(tensors[name], gs.Variable):
            tensors[name].to_constant(np.ascontiguousarray(value))
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = train.eval.ir_version
    del model.opset_import[:]
    model.opset_import.extend(o for o in train.eval.opset_import if o.domain in ("", "ai.onnx"))
    return model


def write_portable(portable: PortableModels, directory: Path) -> PortableSpec:
    """Write the portable files into `directory`; returns the manifest entry that describes them."""
    _externalize(portable.frozen, directory / FROZEN_DATA_FILE, [portable.train_step, portable.eval_step])
    onnx.save(portable.train_step, str(directory / TRAIN_STEP_FILE))
    onnx.save(portable.eval_step, str(directory / EVAL_STEP_FILE))
    trainable = [p.name for p in portable.spec.parameters]
    patches = _save_with_patch_offsets(portable.inference, trainable, directory / INFERENCE_TEMPLATE_FILE)
    write_safetensors(directory / CHECKPOINT_FILE, portable.initial_state, {"step": "0"})
    return dataclasses.replace(portable.spec, inference_patches={k: tuple(v) for k, v in patches.items()})


def _externalize(values: dict[str, np.ndarray], path: Path, models: list[onnx.ModelProto]) -> None:
    """Store `values` once in `path`; every model's initializer of that name references its bytes there."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(path, "wb") as handle:
        for name, value in values.items():
            padding = -handle.tell() % _EXTERNAL_ALIGNMENT
            handle.write(b"\0" * padding)
            data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            offsets[name] = (handle.tell(), len(data))
            handle.write(data)
    for model in models:
        for tensor in model.graph.initializer:
            if tensor.name in offsets:
                offset, length = offsets[tensor.name]
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=key, value=value)


def _save_with_patch_offsets(model: onnx.ModelProto, names: list[str], path: Path) -> dict[str, list[int]]:
    """Save `model`; return, per initializer in `names`, the [offset, length] of its raw bytes in the file.

    The offsets are found by serializing once with a random marker in each of those tensors (the
    same lengths, so the same layout) and locating each marker, which must occur exactly once.
    """
    tensors = {t.name: t for t in model.graph.initializer if t.name in names}
    real = {name: bytes(t.raw_data) for name, t in tensors.items()}
    if any(not data for data in real.values()):
        raise GfError("internal error: an inference weight has no raw data")
    for _attempt in range(8):
        markers = {name: secrets.token_bytes(len(data)) for name, data in real.items()}
        for name, tensor in tensors.items():
            tensor.raw_data = markers[name]
        blob = model.SerializeToString()
        found = {name: blob.find(marker) for name, marker in markers.items()}
        if all(offset >= 0 and blob.count(markers[name]) == 1 for name, offset in found.items()):
            break
    else:
        raise GfError("internal error: could not locate the trainable weights in the inference model")
    patched = bytearray(blob)
    for name, offset in found.items():
        patched[offset : offset + len(real[name])] = real[name]
        tensors[name].raw_data = real[name]
    path.write_bytes(bytes(patched))
    return {name: [offset, len(real[name])] for name, offset in found.items()}
