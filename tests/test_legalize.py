"""Legalize passes (issue 13): each on a tiny hand-built graph, against onnxruntime's own kernels for
the forward and PyTorch autograd for the gradient that onnxruntime-training builds afterwards."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gfcompile.passrunner import run_passes
from passes import concat_inputs, layernorm_outputs, legalize_activations, legalize_resize, untie_parameters
from passes.parameters import state_slots
from runtime.ort_training import training_api, training_submodule

torch = pytest.importorskip("torch")
F = torch.nn.functional

OPSET = 17


def legalize(model: onnx.ModelProto, *passes) -> onnx.ModelProto:
    return run_passes(passes, model, None, stage="legalize", history=[])


def run_forward(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def make_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "legalize_test", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def ort_gradients(model: onnx.ModelProto, trainable: list[str], x: np.ndarray, target: np.ndarray):
    """Loss and gradients of mean((output - target)^2) as onnxruntime-training computes them."""
    artifacts = training_submodule("artifacts")
    api = training_api()
    with tempfile.TemporaryDirectory() as directory:
        artifacts.generate_artifacts(
            model,
            requires_grad=trainable,
            loss=artifacts.LossType.MSELoss,
            optimizer=artifacts.OptimType.SGD,
            artifact_directory=directory,
        )
        state = api.CheckpointState.load_checkpoint(os.path.join(directory, "checkpoint"))
        module = api.Module(os.path.join(directory, "training_model.onnx"), state)
        module.train()
        loss = float(module(x, target))
        return loss, {name: np.array(state.parameters[name].grad) for name in trainable}


def torch_gradients(forward, parameters: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray):
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in parameters.items()}
    loss = F.mse_loss(forward(torch.from_numpy(x), tensors), torch.from_numpy(target))
    loss.backward()
    return float(loss.detach()), {name: tensor.grad.numpy() for name, tensor in tensors.items()}


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) / scale <= tolerance


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = {
    # op, attributes, the same function in torch
    "HardSigmoid": ({"alpha": 0.2, "beta": 0.4}, lambda x: torch.clamp(0.2 * x + 0.4, 0, 1)),
    "HardSwish": ({}, F.hardswish),
    "Elu": ({"alpha": 0.7}, lambda x: F.elu(x, alpha=0.7)),
    "Selu": ({}, F.selu),
    "Celu": ({"alpha": 1.5}, lambda x: F.celu(x, alpha=1.5)),
    "Softsign": ({}, F.softsign),
    "Softplus": ({}, F.softplus),
    "Mish": ({}, F.mish),
}
OPSET_OF = {"Mish": 18}


def scaled_activation_model(op: str, attrs: dict, scale: np.ndarray) -> onnx.ModelProto:
    """y = op(x * scale): `scale` is the trainable tensor whose gradient flows through the op."""
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
        helper.make_node(op, ["scaled"], ["y"], name="act", **attrs),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 5])
    model = make_model(nodes, [x], [y], [numpy_helper.from_array(scale, "scale")])
    model.opset_import[0].version = OPSET_OF.get(op, OPSET)
    return model


@pytest.mark.parametrize("op", list(ACTIVATIONS))
def test_activation_rewrite_matches_ort_and_torch_gradient(op: str) -> None:
    attrs, torch_fn = ACTIVATIONS[op]
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 1.5, (1, 3, 1, 1)).astype(np.float32)
    x = (rng.standard_normal((2, 3, 5, 5)) * 3).astype(np.float32)
    x[0, 0, 0, :3] = (0.0, 30.0, -30.0)  # softplus: the kink-free point, and both sides of its switch
    target = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    original = scaled_activation_model(op, attrs, scale)
    legal = legalize(original, legalize_activations)

    assert op not in {node.op_type for node in legal.graph.node}
    (expected,) = run_forward(original, {"x": x})
    (actual,) = run_forward(legal, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(Exception, match="gradient builder has not been registered"):
        ort_gradients(original, ["scale"], x, target)
    loss, grads = ort_gradients(legal, ["scale"], x, target)
    ref_loss, ref_grads = torch_gradients(lambda t, p: torch_fn(t * p["scale"]), {"scale": scale}, x, target)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert_close(grads["scale"], ref_grads["scale"], 1e-5)


def test_prelu_slope_still_trains() -> None:
    rng = np.random.default_rng(13)
    slope = rng.uniform(0.05, 0.3, (3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["y"], name="prelu")]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])],
        [numpy_helper.from_array(slope, "slope")],
    )
    legal = legalize(model, legalize_activations)
    assert "PRelu" not in {node.op_type for node in legal.graph.node}
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    target = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_forward(legal, {"x": x})[0], run_forward(model, {"x": x})[0], rtol=1e-6, atol=1e-7)
    loss, grads = ort_gradients(legal, ["slope"], x, target)
    ref_loss, ref = torch_gradients(lambda t, p: F.prelu(t, p["slope"].reshape(-1)), {"slope": slope}, x, target)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert_close(grads["slope"], ref["slope"], 1e-5)


def test_activation_constants_are_not_initializers() -> None:
    """The planner reads float initializers in parameter inputs as layer parameters; a rewrite's
    alpha/beta must not become one."""
    legal = legalize(scaled_activation_model("HardSwish", {}, np.ones((1, 3, 1, 1), np.float32)), legalize_activations)
    assert [init.name for init in legal.graph.initializer] == ["scale"]


# ----------------------------------------------------------------------------------------------
# Resize
# ----------------------------------------------------------------------------------------------


def resize_model(in_hw, mode, coordinates, nearest_mode, scales=None, sizes=None) -> onnx.ModelProto:
    inputs = ["x", "", "", ""]
    initializers = []
    if scales is not None:
        initializers.append(numpy_helper.from_array(np.array([1, 1, *scales], np.float32), "scales"))
        inputs = ["x", "", "scales"]
    else:
        initializers.append(numpy_helper.from_array(np.array([2, 3, *sizes], np.int64), "sizes"))
        inputs = ["x", "", "", "sizes"]
    node = helper.make_node(
        "Resize",
        inputs,
        ["y"],
        name="resize",
        mode=mode,
        coordinate_transformation_mode=coordinates,
        nearest_mode=nearest_mode,
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, *in_hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model([node], [x], [y], initializers)


RESIZE_CASES = [
    # in (H, W), mode, coordinate mode, nearest mode, scales, sizes
    ((4, 5), "linear", "half_pixel", "floor", (2.0, 2.0), None),
    ((4, 5), "linear", "pytorch_half_pixel", "floor", None, (9, 1)),
    ((1, 1), "linear", "pytorch_half_pixel", "floor", None, (6, 7)),
    ((4, 5), "linear", "align_corners", "floor", None, (7, 11)),
    ((6, 7), "linear", "asymmetric", "floor", (0.5, 1.5), None),
    ((8, 8), "linear", "half_pixel", "floor", None, (3, 5)),
    ((4, 5), "nearest", "asymmetric", "floor", (2.0, 3.0), None),
    ((4, 5), "nearest", "half_pixel", "round_prefer_floor", None, (6, 7)),
    ((4, 5), "nearest", "align_corners", "round_prefer_ceil", None, (7, 3)),
    ((5, 4), "nearest", "tf_half_pixel_for_nn", "ceil", (1.5, 0.5), None),
    ((3, 3), "nearest", "pytorch_half_pixel", "round_prefer_floor", None, (3, 3)),
]


@pytest.mark.parametrize("in_hw, mode, coordinates, nearest_mode, scales, sizes", RESIZE_CASES)
def test_resize_rewrite_matches_ort_resize(in_hw, mode, coordinates, nearest_mode, scales, sizes) -> None:
    original = resize_model(in_hw, mode, coordinates, nearest_mode, scales, sizes)
    legal = legalize(original, legalize_resize)
    assert "Resize" not in {node.op_type for node in legal.graph.node}
    x = np.random.default_rng(1).standard_normal((2, 3, *in_hw)).astype(np.float32)
    (expected,) = run_forward(original, {"x": x})
    (actual,) = run_forward(legal, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_resize_sizes_computed_from_shapes_as_torch_exports_them() -> None:
    """torchvision's segmentation heads resize to a size read off another tensor with Shape/Gather."""

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "head.onnx")
        x, like = torch.randn(2, 3, 4, 5), torch.randn(2, 1, 13, 11)
        torch.onnx.export(
            Head(),
            (x, like),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["x", "like"],
            dynamic_axes={"x": {0: "batch"}, "like": {0: "batch"}},
        )
        original = onnx.load(path)
    legal = legalize(original, legalize_resize)
    assert "Resize" not in {node.op_type for node in legal.graph.node}
    (actual,) = run_forward(legal, {"x": x.numpy(), "like": like.numpy()})
    np.testing.assert_allclose(actual, Head()(x, like).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mode, align_corners", [("bilinear", False), ("bilinear", True), ("nearest", None)], ids=["half", "corners", "near"]
)
def test_resize_gradient_matches_torch_interpolate(mode: str, align_corners: bool | None) -> None:
    """Through the rewrite, ORT's gradient of a scale before the upsampling equals torch autograd
    (the original Resize has no CPU gradient kernel)."""

    def forward(x, p):
        return F.interpolate(x * p["scale"], size=(11, 9), mode=mode, align_corners=align_corners)

    coordinates = {None: "asymmetric", False: "pytorch_half_pixel", True: "align_corners"}[align_corners]
    onnx_mode = "linear" if mode == "bilinear" else "nearest"
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.5, 1.5, (1, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
        helper.make_node(
            "Resize",
            ["scaled", "", "", "sizes"],
            ["y"],
            name="up",
            mode=onnx_mode,
            coordinate_transformation_mode=coordinates,
            nearest_mode="floor",
        ),
    ]
    initializers = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(np.array([2, 3, 11, 9]), "sizes")]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 11, 9])],
        initializers,
    )
    legal = legalize(model, legalize_resize)
    x = rng.standard_normal((2, 3, 4, 3)).astype(np.float32)
    target = rng.standard_normal((2, 3, 11, 9)).astype(np.float32)
    loss, grads = ort_gradients(legal, ["scale"], x, target)
    ref_loss, ref_grads = torch_gradients(forward, {"scale": scale}, x, target)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert_close(grads["scale"], ref_grads["scale"], 1e-5)


def test_resize_without_rewrite_is_left_alone_with_a_reason(caplog) -> None:
    """Cubic interpolation has no rewrite here; in the frozen part it needs none, so it stays."""
    model = resize_model((4, 4), "cubic", "half_pixel", "floor", scales=(2.0, 2.0))
    with caplog.at_level("WARNING", logger="gfcompile.passes.legalize_resize"):
        legal = legalize(model, legalize_resize)
    assert [node.op_type for node in legal.graph.node] == ["Resize"]
    assert "mode 'cubic' has no differentiable rewrite" in caplog.text


# ----------------------------------------------------------------------------------------------
# LayerNormalization outputs
# ----------------------------------------------------------------------------------------------


def test_layernorm_outputs_let_ort_build_the_gradient() -> None:
    """ConvNeXt's channels-last LayerNorm: ORT's gradient reads Mean and InvStdDev, which torch omits."""
    rng = np.random.default_rng(3)
    weight = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("LayerNormalization", ["nhwc", "ln.weight", "ln.bias"], ["normed"], axis=-1, name="ln"),
        helper.make_node("Transpose", ["normed"], ["y"], perm=[0, 3, 1, 2], name="to_nchw"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])],
        [numpy_helper.from_array(weight, "ln.weight"), numpy_helper.from_array(bias, "ln.bias")],
    )
    legal = legalize(model, layernorm_outputs)
    (ln,) = [node for node in legal.graph.node if node.op_type == "LayerNormalization"]
    assert len(ln.output) == 3 and all(ln.output)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    target = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(run_forward(legal, {"x": x})[0], run_forward(model, {"x": x})[0])

    def forward(t, p):
        normed = F.layer_norm(t.permute(0, 2, 3, 1), (4,), p["ln.weight"], p["ln.bias"], eps=1e-5)
        return normed.permute(0, 3, 1, 2)

    loss, grads = ort_gradients(legal, ["ln.weight", "ln.bias"], x, target)
    ref_loss, ref_grads = torch_gradients(forward, {"ln.weight": weight, "ln.bias": bias}, x, target)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-5)


# ----------------------------------------------------------------------------------------------
# Untie parameters
# ----------------------------------------------------------------------------------------------


def tied_model() -> onnx.ModelProto:
    """What torch.onnx.export's deduplication leaves: conv2's bias is an Identity of conv1's bias,
    conv3 reads conv1's bias directly, and BN's weight is its own running variance."""
    rng = np.random.default_rng(4)
    tensors = {
        "conv1.weight": rng.standard_normal((3, 3, 3, 3)),
        "conv1.bias": rng.standard_normal(3),
        "conv2.weight": rng.standard_normal((3, 3, 1, 1)),
        "conv3.weight": rng.standard_normal((3, 3, 1, 1)),
        "bn.running_var": rng.uniform(0.5, 1.5, 3),
        "bn.bias": rng.standard_normal(3),
        "bn.running_mean": rng.standard_normal(3),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()]
    nodes = [
        helper.make_node("Identity", ["conv1.bias"], ["conv2.bias"], name="alias"),
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node(
            "BatchNormalization",
            ["a", "bn.running_var", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["b"],
            name="bn",
        ),
        helper.make_node("Conv", ["b", "conv2.weight", "conv2.bias"], ["c"], name="conv2"),
        helper.make_node("Conv", ["c", "conv3.weight", "conv1.bias"], ["y"], name="conv3"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])],
        initializers,
    )


def test_untie_gives_every_state_input_its_own_tensor() -> None:
    model = tied_model()
    legal = legalize(model, untie_parameters)
    assert "Identity" not in {node.op_type for node in legal.graph.node}
    state_inputs = [
        node.input[slot] for node in legal.graph.node for slot in state_slots(node.op_type) if slot < len(node.input)
    ]
    assert len(state_inputs) == len(set(state_inputs)) == 10
    initializers = {init.name: numpy_helper.to_array(init) for init in legal.graph.initializer}
    assert set(state_inputs) <= set(initializers)
    # The alias keeps its state-dict name; the first reader keeps the original tensor.
    nodes = {node.name: node for node in legal.graph.node}
    assert nodes["conv2"].input[2] == "conv2.bias" and nodes["conv1"].input[2] == "conv1.bias"
    assert nodes["bn"].input[1] == "bn.running_var" and nodes["bn"].input[4] != "bn.running_var"
    np.testing.assert_array_equal(initializers[nodes["conv3"].input[2]], initializers["conv1.bias"])
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_forward(legal, {"x": x})[0], run_forward(model, {"x": x})[0])


def test_untied_biases_train_separately() -> None:
    """Two layers that shared one bias get each its own gradient, as two torch parameters would."""
    legal = legalize(tied_model(), untie_parameters)
    nodes = {node.name: node for node in legal.graph.node}
    bias2, bias3 = nodes["conv2"].input[2], nodes["conv3"].input[2]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    target = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    _, grads = ort_gradients(legal, [bias2, bias3], x, target)
    initializers = {init.name: numpy_helper.to_array(init) for init in legal.graph.initializer}
    weights = {name: torch.tensor(initializers[name]) for name in ("conv2.weight", "conv3.weight")}

    def forward(t, p):
        a = F.conv2d(t, torch.tensor(initializers["conv1.weight"]), torch.tensor(initializers["conv1.bias"]), padding=1)
        # onnxruntime-training runs BatchNormalization with batch statistics (the compiler's
        # bn_eval_affine pass is what keeps BN in eval mode); compare like with like.
        mean, var, gamma, beta = (torch.tensor(initializers[nodes["bn"].input[i]]) for i in (3, 4, 1, 2))
        b = F.batch_norm(a, mean, var, gamma, beta, training=True, eps=1e-5)
        c = F.conv2d(b, weights["conv2.weight"], p["b2"])
        return F.conv2d(c, weights["conv3.weight"], p["b3"])

    _, ref = torch_gradients(forward, {"b2": initializers[bias2], "b3": initializers[bias3]}, x, target)
    assert_close(grads[bias2], ref["b2"], 1e-5)
    assert_close(grads[bias3], ref["b3"], 1e-5)
    assert not np.allclose(grads[bias2], grads[bias3])


# ----------------------------------------------------------------------------------------------
# Concat inputs (ORT's duplicate gradient name)
# ----------------------------------------------------------------------------------------------


class TinyDenseNet(torch.nn.Module):
    """Two dense blocks and a transition: every Concat of a block reads the block's input."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(3, 4, 3, padding=1)
        self.block1 = torch.nn.ModuleList(
            [conv(4, 2, 3, padding=1), conv(6, 2, 3, padding=1), conv(8, 2, 3, padding=1)]
        )
        self.transition = conv(10, 4, 1)
        self.block2 = torch.nn.ModuleList([conv(4, 2, 3, padding=1), conv(6, 2, 3, padding=1)])
        self.side = conv(4, 2, 1)
        self.fc = torch.nn.Linear(14, 5)

    @staticmethod
    def dense(x, layers):
        features = [x]
        for layer in layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        return torch.cat(features, 1)

    def forward(self, x):
        x = self.dense(self.stem(x), self.block1)
        t = F.avg_pool2d(self.transition(x), 2)
        # The transition output also feeds a Concat where it is not a prefix: no nesting applies.
        both = torch.cat([self.dense(t, self.block2), self.side(t), t], 1)
        return self.fc(both.mean((2, 3)))


class SharedConcatInput(torch.nn.Module):
    """One tensor read by two Concats where it is no prefix: only a copy per Concat helps."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem, self.a, self.b = conv(3, 4, 3, padding=1), conv(4, 2, 3, padding=1), conv(4, 2, 3, padding=1)
        self.c, self.d, self.e = conv(6, 2, 1), conv(6, 2, 1), conv(4, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        left, right = torch.cat([self.a(x), x], 1), torch.cat([self.b(x), x], 1)
        return self.e(torch.cat([self.c(left), self.d(right)], 1)).mean((2, 3))


def test_concat_inputs_nest_and_copy() -> None:
    from models.export import export_onnx

    with tempfile.TemporaryDirectory() as directory:
        model = onnx.load(str(export_onnx(TinyDenseNet(), os.path.join(directory, "dense.onnx"), (2, 3, 8, 8))))
    legal = legalize(model, concat_inputs)
    reads: dict[str, int] = {}
    for node in legal.graph.node:
        if node.op_type == "Concat":
            for name in node.input:
                reads[name] = reads.get(name, 0) + 1
    assert max(reads.values()) == 1
    x = np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_forward(legal, {"input": x})[0], run_forward(model, {"input": x})[0])


# ----------------------------------------------------------------------------------------------
# End to end: compiled training step vs torch autograd
# ----------------------------------------------------------------------------------------------


def compiled_gradients(onnx_path, train_layers: int, x: np.ndarray, y: np.ndarray, out):
    """Loss, gradients and the plan of one compiled training step (exact backward)."""
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from runtime.trainer import Trainer

    config = CompileConfig(
        filter_layers=0,
        train_layers=train_layers,
        batch_size=x.shape[0],
        optimizer="sgd",
        momentum=0.0,
        output_dir=out,
    )
    trainer = Trainer(compile_model(onnx_path, config, report=lambda message: None))
    trainer.module.train()
    loss = float(trainer.module(x, y)[0])
    plan = trainer.manifest["plan"]
    grads = {name: np.array(trainer.state.parameters[name].grad) for name in plan["trainable_params"]}
    return loss, grads, plan


def check_against_torch(model, onnx_path, train_layers: int, x, y, out) -> dict:
    from tests.zoo_helpers import relative_error, torch_reference

    loss, grads, plan = compiled_gradients(onnx_path, train_layers, x, y, out)
    named = dict(model.named_parameters())
    assert set(grads) <= set(named), "every trained tensor is one torch parameter, under its own name"
    ref_loss, ref_grads = torch_reference(model, list(grads), x, y)
    assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    for name, expected in ref_grads.items():
        assert relative_error(grads[name], expected) <= 1e-4, name
    return plan


class MobileSegmenter(torch.nn.Module):
    """HardSwish, a squeeze-excitation gate (1x1 convs on a 1x1 map, HardSigmoid), two convs whose
    equal biases torch.onnx.export's deduplication ties, and a bilinear upsampling of the logits."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(3, 8, 3, stride=2, padding=1)
        self.fc1, self.fc2 = conv(8, 4, 1), conv(4, 8, 1)
        self.mix1, self.mix2 = conv(8, 8, 1), conv(8, 8, 3, padding=1)
        self.head = conv(8, 5, 1)
        with torch.no_grad():
            self.mix1.bias.fill_(0.1)
            self.mix2.bias.fill_(0.1)

    def forward(self, x):
        size = x.shape[-2:]
        x = F.hardswish(self.stem(x))
        gate = F.hardsigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = torch.relu(self.mix2(torch.relu(self.mix1(x * gate))))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("train_layers", [6, 3])
def test_default_export_trains_exactly(tmp_path, train_layers: int) -> None:
    torch.manual_seed(0)
    model = MobileSegmenter().eval()
    x = np.random.default_rng(8).standard_normal((2, 3, 12, 12)).astype(np.float32)
    y = np.random.default_rng(9).integers(0, 5, (2, 12, 12)).astype(np.int64)
    path = tmp_path / "default.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False)  # default arguments: dedup on
    exported = onnx.load(str(path))
    ops = {node.op_type for node in exported.graph.node}
    assert {"HardSwish", "HardSigmoid", "Resize", "Identity"} <= ops, "the export still has what this test is about"

    plan = check_against_torch(model, path, train_layers, x, y, tmp_path / "artifacts")
    expected = {name for name, _ in model.named_parameters() if name.split(".")[0] in ("mix1", "mix2", "head")}
    if train_layers == 6:
        expected = {name for name, _ in model.named_parameters()}
    assert set(plan["trainable_params"]) == expected


@pytest.mark.parametrize("train_layers", [2, 5, 7, 8])
def test_dense_concats_train_exactly_at_any_depth(tmp_path, train_layers: int) -> None:
    """Without concat_inputs, onnxruntime-training fails here at 2 and 7 trained layers (duplicate gradient name)."""
    from models.export import export_onnx

    torch.manual_seed(0)
    model = TinyDenseNet().eval()
    path = export_onnx(model, tmp_path / "dense.onnx", (2, 3, 8, 8))
    x = np.random.default_rng(10).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = np.array([1, 3], dtype=np.int64)
    plan = check_against_torch(model, path, train_layers, x, y, tmp_path / "artifacts")
    assert len(plan["trainable_convs"]) == train_layers


class ConvNeXtBlock(torch.nn.Module):
    """ConvNeXt's block: depthwise conv, channels-last LayerNorm (no Mean/InvStdDev outputs in the
    export), Linear layers whose weights reach MatMul through a Transpose, and a layer scale. (ReLU
    for GELU: ORT fuses the exported Erf pattern into com.microsoft Gelu, a separate matter.)"""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 2, stride=2)
        self.dwconv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = torch.nn.LayerNorm(8)
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.layer_scale = torch.nn.Parameter(torch.full((8,), 0.3))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.layer_scale * self.down(torch.relu(self.up(y)))
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


def test_convnext_block_trains_every_parameter_exactly(tmp_path) -> None:
    """Legalized and planned as the compiler does, ORT's gradient of every planned parameter
    (the Linear weights behind their Transposes included) equals torch autograd."""
    from gfcompile.config import CompileConfig
    from gfcompile.loading import pin_shapes
    from gfcompile.pipeline import LEGALIZE_PASSES
    from gfcompile.planning import select_layers
    from models.export import export_onnx

    torch.manual_seed(0)
    model = ConvNeXtBlock().eval()
    path = export_onnx(model, tmp_path / "convnext.onnx", (2, 3, 8, 8))
    config = CompileConfig(train_layers=1, batch_size=2)
    legal = pin_shapes(legalize(onnx.load(str(path)), *LEGALIZE_PASSES), config)
    plan = select_layers(legal, config)
    named = dict(model.named_parameters())
    assert set(plan.trainable_params) == {name for name in named if not name.startswith("stem")}

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = rng.standard_normal((2, 4)).astype(np.float32)
    loss, grads = ort_gradients(legal, plan.trainable_params, x, target)
    parameters = {name: named[name].detach().numpy().copy() for name in plan.trainable_params}
    ref_loss, ref_grads = torch_gradients(
        lambda t, p: torch.func.functional_call(model, p, (t,)), parameters, x, target
    )
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    for name in plan.trainable_params:
        assert_close(grads[name], ref_grads[name], 1e-4)


def test_shared_concat_input_trains_exactly(tmp_path) -> None:
    """Without the Identity copies, onnxruntime-training fails here at 5 trained layers."""
    from models.export import export_onnx

    torch.manual_seed(0)
    model = SharedConcatInput().eval()
    path = export_onnx(model, tmp_path / "shared.onnx", (2, 3, 6, 6))
    x = np.random.default_rng(12).standard_normal((2, 3, 6, 6)).astype(np.float32)
    check_against_torch(model, path, 5, x, np.array([4, 0], dtype=np.int64), tmp_path / "artifacts")


class ReusedModule(torch.nn.Module):
    """One 1x1 conv applied twice (real weight sharing), next to two zero biases that the exporter
    deduplicates through an Identity alias (not sharing in PyTorch)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.second = torch.nn.Conv2d(4, 4, 3, padding=1)
        torch.nn.init.zeros_(self.first.bias)
        torch.nn.init.zeros_(self.second.bias)
        self.shared = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.shared(torch.relu(self.shared(self.second(self.first(x)))))
        return self.head(y.mean((2, 3)))


def test_reused_module_is_named_and_aliases_are_not(tmp_path) -> None:
    """Untying a module that the model applies twice changes what trains, so the compile says so;
    the exporter's Identity aliases of equal initializers are untied without a word."""
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model

    torch.manual_seed(0)
    path = tmp_path / "reused.onnx"
    # The user's call: the legacy exporter with default arguments, which deduplicates.
    torch.onnx.export(ReusedModule().eval(), torch.randn(2, 3, 6, 6), str(path), dynamo=False)
    aliases = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Identity"]
    assert aliases, "the exporter no longer deduplicates the zero biases; the alias half proves nothing"
    lines: list[str] = []
    config = CompileConfig(train_layers=4, batch_size=2, output_dir=tmp_path / "out")
    compile_model(path, config, report=lines.append)
    notes = [line for line in lines if line.startswith("note: parameter")]
    assert len(notes) == 2, lines  # shared.weight and shared.bias
    assert all("2 layers" in note and "shared." in note for note in notes)
    assert not any("first.bias" in note or "second.bias" in note for note in notes)
