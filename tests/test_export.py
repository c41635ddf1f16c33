"""`gfcompile export` writes models the compiler takes as they are; compile-time load checks and the
one-line explanations of ORT failures (issue 13, items 1 and 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from gfcompile.cli import main
from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.export import build_model
from gfcompile.loadcheck import check_loadable
from gfcompile.loading import MAX_IR_VERSION, MAX_OPSET
from gfcompile.pipeline import compile_model
from gfcompile.planning import select_layers
from models.export import prediction_module
from runtime.trainer import Trainer
from tests.tiny_models import ConvSpec, tiny_cnn
from tests.zoo_helpers import relative_error, torch

pytest.importorskip("models.torchvision_models")


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def onnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_torchvision_export_keeps_bn_names_and_a_dynamic_batch(tmp_path: Path, capsys) -> None:
    path = tmp_path / "resnet18.onnx"
    code, err = run_cli(capsys, "export", "resnet18", "-o", path, "--input-shape", "3,32,32", "--num-classes", "7")
    assert code == 0, err
    assert "built torchvision resnet18" in err and f"wrote {path}" in err
    model = onnx.load(str(path))
    assert model.ir_version <= MAX_IR_VERSION and model.opset_import[0].version <= MAX_OPSET
    torch.manual_seed(0)
    _, reference = build_model("resnet18", num_classes=7)
    reference.eval()
    state = reference.state_dict()
    names = {init.name for init in model.graph.initializer}
    assert names <= set(state) and "layer1.0.bn1.running_mean" in names  # BN kept, state_dict names
    assert sum(node.op_type == "BatchNormalization" for node in model.graph.node) == 20
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # not the traced batch of 1
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    assert relative_error(onnx_outputs(path, x), expected) <= 1e-5


def test_segmentation_export_has_the_out_tensor_only(tmp_path: Path, capsys) -> None:
    path = tmp_path / "lraspp.onnx"
    code, err = run_cli(
        capsys, "export", "lraspp_mobilenet_v3_large", "-o", path, "--input-shape", "3,32,32", "--num-classes", "3"
    )
    assert code == 0, err
    model = onnx.load(str(path))
    assert len(model.graph.output) == 1
    torch.manual_seed(0)
    _, reference = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    reference.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x))["out"].numpy()
    # The "out" view takes the model's mode: an exporter restoring the view's mode must not put BN in training.
    assert not prediction_module(reference, torch.from_numpy(x)).training
    actual = onnx_outputs(path, x)
    assert actual.shape == (2, 3, 32, 32)
    assert relative_error(actual, expected) <= 1e-5


FACTORY = """
import torch
from torch import nn


def build(num_classes=4):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))


def broken(num_classes=4):
    raise ValueError("no such width")
"""


def test_factory_spec_with_local_weights(tmp_path: Path, capsys) -> None:
    source = tmp_path / "my_net.py"
    source.write_text(FACTORY)
    _, model = build_model(f"{source}:build", num_classes=5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
        model[1].running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "my_net.pt"
    torch.save({"state_dict": model.state_dict()}, weights)  # a training checkpoint's usual wrapping
    path = tmp_path / "my_net.onnx"
    code, err = run_cli(
        capsys,
        "export",
        f"{source}:build",
        "-o",
        path,
        "--input-shape",
        "3,8,8",
        "--num-classes",
        5,
        "--weights",
        weights,
    )
    assert code == 0, err
    model.eval()
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert relative_error(onnx_outputs(path, x), expected) <= 1e-5
    # The compiler takes it as it is.
    config = CompileConfig(train_layers=1, batch_size=4, output_dir=tmp_path / "artifacts")
    assert (compile_model(path, config, report=lambda message: None) / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["resnt18"], "unknown model 'resnt18'"),
        (["zoo:nope"], "unknown zoo model 'nope'"),
        (["missing.py:build"], "missing.py is not a file"),
        (["{dir}/my_net.py:broken"], "broken() from {dir}/my_net.py raised ValueError: no such width"),
        (["{dir}/my_net.py:absent"], "defines no function 'absent'"),
        (["{dir}/my_net.py:build", "--weights", "{dir}/other.pt"], "does not match the model"),
        (["resnet18", "--input-shape", "1,32,32"], "torchvision models take 3 input channels"),
        (["resnet18", "--opset", "22"], "--opset must be in"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], expected: str) -> None:
    (tmp_path / "my_net.py").write_text(FACTORY)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    argv = [arg.replace("{dir}", str(tmp_path)) for arg in argv]
    code, err = run_cli(capsys, "export", *argv, "-o", tmp_path / "out.onnx")
    assert code == 2
    assert err.startswith("gfcompile: error: ") and err.count("\n") == 1, err
    assert expected.replace("{dir}", str(tmp_path)) in err
    assert not (tmp_path / "out.onnx").exists()


def test_existing_output_needs_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep")
    code, err = run_cli(capsys, "export", "zoo:resnet18", "-o", out, "--input-shape", "3,32,32")
    assert code == 2 and "pass --force" in err
    assert out.read_bytes() == b"keep"


# --------------------------------------------------------------------------------------------------
# Failing at compile time, in one line


def tiny_with_op_after_conv1(op: str, **attributes) -> onnx.ModelProto:
    """A three-conv tiny CNN with one `op` node between conv1 and its ReLU."""
    model = tiny_cnn(convs=[ConvSpec(8), ConvSpec(8), ConvSpec(8)], input_shape=(3, 16, 16))
    nodes = list(model.graph.node)
    relu = next(index for index, node in enumerate(nodes) if node.name == "relu1")
    nodes[relu].input[0] = "odd_out"
    odd = helper.make_node(op, ["conv1_out"], ["odd_out"], "odd", **attributes)
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:relu], odd, *nodes[relu:]])
    onnx.checker.check_model(model)
    return model


def test_op_without_gradient_names_node_op_and_a_train_layers_that_works(tmp_path: Path, capsys) -> None:
    path = tmp_path / "shrink.onnx"
    onnx.save(tiny_with_op_after_conv1("Shrink", lambd=0.1), str(path))
    out = tmp_path / "artifacts"
    code, err = run_cli(capsys, path, "--train-layers", 3, "--batch-size", 2, "-o", out, "-q")
    assert code == 2
    assert err.count("\n") == 1 and "onnxruntime_src" not in err and "was false" not in err, err
    assert "node 'odd' (Shrink) has no gradient" in err
    assert "--train-layers 2 (or fewer)" in err
    assert not out.exists()
    # The advice holds: two convs come after the node, and training them compiles.
    code, err = run_cli(capsys, path, "--train-layers", 2, "--batch-size", 2, "-o", out, "-q")
    assert code == 0, err


def test_unloadable_artifacts_are_refused_with_the_forward_node(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_with_op_after_conv1("Neg"), str(path))
    config = CompileConfig(train_layers=2, batch_size=2, output_dir=tmp_path / "artifacts")
    artifacts = compile_model(path, config, report=lambda message: None)
    plan_model = onnx.load(str(path))
    training_path = artifacts / "training_model.onnx"
    training = onnx.load(str(training_path))
    # A gradient op with no CPU kernel in ORT 1.19 (what torchvision's F.interpolate used to produce),
    # named the way ORT's gradient builder names it after forward node 'odd' (the Neg).
    scales = helper.make_tensor("odd_scales", onnx.TensorProto.FLOAT, [4], [1, 1, 1, 1])
    training.graph.initializer.append(scales)
    training.graph.node.append(
        helper.make_node(
            "ResizeGrad",
            ["relu2", "relu2", "", "odd_scales"],
            ["odd_grad"],
            "odd_Grad/ResizeGrad_0",
            domain="com.microsoft",
        )
    )
    training.graph.output.append(helper.make_tensor_value_info("odd_grad", onnx.TensorProto.FLOAT, None))
    onnx.save(training, str(training_path))
    from gfcompile.loading import pin_shapes

    plan = select_layers(pin_shapes(plan_model, config), config)
    with pytest.raises(GfError) as raised:
        check_loadable(artifacts, {}, plan_model, plan)
    message = str(raised.value)
    assert "\n" not in message
    assert "node 'odd' (Neg): its gradient op ResizeGrad" in message and "no CPU kernel" in message
    assert "--train-layers 2 (or fewer)" in message


# --------------------------------------------------------------------------------------------------
# What torch's default exporter writes

DYNAMO = Path(__file__).parent / "data" / "dynamo_tiny"


def test_default_exporter_output_compiles_and_matches_torch(tmp_path: Path) -> None:
    """tiny_dynamo.onnx is a plain `torch.onnx.export(model, x, path)` with torch 2.13's dynamo exporter
    (see make_tiny_dynamo.py): IR 10, opset 20, external data, BatchNorm folded into conv1/conv2."""
    from tests.data.dynamo_tiny.make_tiny_dynamo import Tiny

    source = onnx.load(str(DYNAMO / "tiny_dynamo.onnx"), load_external_data=False)
    assert source.ir_version == 10 and source.opset_import[0].version == 20
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in source.graph.initializer)
    model = Tiny()
    state = np.load(DYNAMO / "tiny_dynamo_state.npz")
    model.load_state_dict({key: torch.from_numpy(state[key]) for key in state.files})
    model.eval()
    config = CompileConfig(train_layers=2, batch_size=2, optimizer="sgd", momentum=0.0, output_dir=tmp_path / "out")
    trainer = Trainer(compile_model(DYNAMO / "tiny_dynamo.onnx", config, report=lambda message: None))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 5, size=2).astype(np.int64)
    trainer.module.train()
    loss = float(trainer.module(x, y)[0])
    logits = model(torch.from_numpy(x))
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    expected.backward()
    assert abs(loss - expected.item()) <= 1e-5
    # conv3 and fc are not folded, so their gradients are torch's own.
    named = dict(model.named_parameters())
    for name in ("conv3.weight", "conv3.bias", "fc.weight", "fc.bias"):
        actual = trainer.state.parameters[name].grad
        assert relative_error(actual, named[name].grad.numpy()) <= 1e-4, name


# ORT's own failure texts, as onnxruntime-training 1.19.2 printed them for torchvision models before
# the legalize passes existed (HardSigmoid in MobileNetV3, a Concat-shared tensor in DenseNet, a
# LayerNormalization without its optional outputs in ConvNeXt).
_BUILDER = "/onnxruntime_src/orttraining/orttraining/core/graph/"
ORT_TEXTS = {
    "no_gradient": f"{_BUILDER}gradient_builder_registry.cc:29 onnxruntime::training::GradientDef "
    "onnxruntime::training::GetGradientForOp(const GradientGraphConfiguration&, onnxruntime::Graph*, const "
    "onnxruntime::Node*) gradient_builder != nullptr was false. The gradient builder has not been registered: "
    "HardSigmoid for node odd",
    "duplicate": "/onnxruntime_src/orttraining/orttraining/python/orttraining_pybind_state.cc:621 "
    "onnxruntime::python::addObjectMethodsForTraining(pybind11::module&)::<lambda(onnxruntime::python::"
    "PyGradientGraphBuilderContext*)> [ONNXRuntimeError] : 1 : FAIL : This is an invalid model. Error: Duplicate "
    "definition of name (odd_out_grad).",
    "missing_output": f"{_BUILDER}gradient_builder_base.h:123 onnxruntime::training::ArgDef onnxruntime::training::"
    "GradientBuilderBase::O(size_t, bool) const i < node_->OutputDefs().size() was false.",
}


@pytest.mark.parametrize(
    ("kind", "op", "expected"),
    [
        (
            "no_gradient",
            "HardSigmoid",
            "node 'odd' (HardSigmoid) has no gradient in onnxruntime-training 1.19; "
            "--train-layers 2 (or fewer) trains only the conv layers after it",
        ),
        ("duplicate", "Neg", "tensor 'odd_out' (output of Neg node 'odd') is read by 1 Relu nodes"),
        (
            "missing_output",
            "LayerNormalization",
            "node 'odd' (LayerNormalization) lacks the optional Mean and InvStdDev outputs",
        ),
    ],
)
def test_ort_failure_texts_become_one_line(kind: str, op: str, expected: str) -> None:
    from gfcompile.ort_errors import explain_ort_failure

    attributes = {"axis": 1} if op == "LayerNormalization" else {}
    model = tiny_with_op_after_conv1("Neg")
    odd = next(node for node in model.graph.node if node.name == "odd")
    odd.op_type = op  # only the node's identity matters to the explanation
    odd.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    config = CompileConfig(train_layers=3, batch_size=2)
    from gfcompile.loading import pin_shapes

    plan = select_layers(pin_shapes(tiny_with_op_after_conv1("Neg"), config), config)
    message = explain_ort_failure(ORT_TEXTS[kind], model, plan)
    assert expected in message
    assert "\n" not in message and "onnxruntime_src" not in message and "was false" not in message
