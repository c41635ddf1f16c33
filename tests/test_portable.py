"""Portable training artifacts: the lowering of onnxruntime-training's ops to standard ONNX ops,
the pure-function train step, and the plain-onnxruntime runtime backend.

The reference for every lowered op is onnxruntime-training's own kernel for the op it replaces
(the training build registers them in its InferenceSession), run on the same random inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gfcompile.passrunner import run_passes
from gfcompile.pipeline import LOWER_PASSES
from passes.base import Plan

MS = "com.microsoft"


def _model(nodes, inputs: dict[str, tuple], outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    def value(name, spec):
        shape, dtype = spec
        return helper.make_tensor_value_info(name, dtype, list(shape))

    graph = helper.make_graph(
        nodes,
        "case",
        [value(n, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(inputs: dict[str, tuple], seed: int = 0, overrides: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in inputs.items():
        if dtype == TensorProto.FLOAT:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    feeds.update(overrides or {})
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def _standard_only(model: onnx.ModelProto) -> None:
    foreign = [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)]
    assert not foreign, foreign


def _check_lowering(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    expected = _run(model, feeds)
    lowered = run_passes(LOWER_PASSES, model, Plan(convs=[]), stage="lower")
    _standard_only(lowered)
    actual = _run(lowered, feeds)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


CONV_CASES = {
    # (N, C, H, W), (M, k), strides, pads, dilations, group
    "3x3": ((2, 4, 9, 9), (6, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "3x3_stride2_odd": ((2, 4, 9, 10), (6, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "5x3_asym_pads_stride": ((1, 3, 11, 8), (4, (5, 3)), (3, 2), (2, 0, 1, 1), (1, 1), 1),
    "dilated": ((2, 4, 12, 12), (4, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "dilated_strided": ((2, 4, 13, 13), (4, 3), (2, 2), (2, 2, 2, 2), (2, 2), 1),
    "grouped": ((2, 6, 8, 8), (9, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    "depthwise_stride2": ((2, 8, 9, 9), (8, 3), (2, 2), (1, 1, 1, 1), (1, 1), 8),
    "pointwise": ((3, 8, 5, 5), (16, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "pointwise_stride2": ((3, 8, 7, 6), (16, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "pointwise_batch1": ((1, 8, 5, 5), (4, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "7x7_stem": ((2, 3, 16, 16), (8, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_grad_lowering_matches_ort_kernel(case: str) -> None:
    x_shape, (m, k), strides, pads, dilations, group = CONV_CASES[case]
    kernel = (k, k) if isinstance(k, int) else k
    n, c, h, w = x_shape
    out = [
        (size + pads[a] + pads[a + 2] - (kernel[a] - 1) * dilations[a] - 1) // strides[a] + 1
        for a, size in enumerate((h, w))
    ]
    inputs = {
        "dy": ((n, m, *out), TensorProto.FLOAT),
        "x": (x_shape, TensorProto.FLOAT),
        "w": ((m, c // group, *kernel), TensorProto.FLOAT),
    }
    node = helper.make_node(
        "ConvGrad",
        ["dy", "x", "w"],
        ["dx", "dw", "db"],
        domain=MS,
        kernel_shape=list(kernel),
        strides=list(strides),
        pads=list(pads),
        dilations=list(dilations),
        group=group,
    )
    _check_lowering(_model([node], inputs, ["dx", "dw", "db"]), _feeds(inputs))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("spatial", [(), (3, 4)])
def test_softmax_cross_entropy_grad_lowering(reduction: str, spatial: tuple) -> None:
    n, classes = 4, 5
    rng = np.random.default_rng(3)
    labels = rng.integers(0, classes, size=(n, *spatial)).astype(np.int64)
    labels.flat[1] = 255  # an ignored label
    inputs = {"logits": ((n, classes, *spatial), TensorProto.FLOAT), "labels": ((n, *spatial), TensorProto.INT64)}
    nodes = [
        helper.make_node(
            "SoftmaxCrossEntropyLoss",
            ["logits", "labels"],
            ["loss", "log_prob"],
            reduction=reduction,
            ignore_index=255,
        ),
        helper.make_node("Constant", [], ["dloss"], value=helper.make_tensor("d", TensorProto.FLOAT, [], [0.7])),
        helper.make_node(
            "SoftmaxCrossEntropyLossGrad",
            ["dloss", "log_prob", "labels"],
            ["dlogits"],
            domain=MS,
            reduction=reduction,
            ignore_index=255,
        ),
    ]
    _check_lowering(_model(nodes, inputs, ["loss", "dlogits"]), _feeds(inputs, overrides={"labels": labels}))


def test_batchnorm_train_mode_lowering() -> None:
    shape, channels = (4, 3, 5, 5), 3
    inputs = {
        "x": (shape, TensorProto.FLOAT),
        "dy": (shape, TensorProto.FLOAT),
        "scale": ((channels,), TensorProto.FLOAT),
        "bias": ((channels,), TensorProto.FLOAT),
        "mean": ((channels,), TensorProto.FLOAT),
        "var": ((channels,), TensorProto.FLOAT),
    }
    nodes = [
        helper.make_node(
            "BatchNormInternal",
            ["x", "scale", "bias", "mean", "var"],
            ["y", "running_mean", "running_var", "saved_mean", "saved_inv_std"],
            domain=MS,
            epsilon=1e-5,
            momentum=0.9,
            training_mode=1,
        ),
        helper.make_node(
            "BatchNormalizationGrad",
            ["dy", "x", "scale", "saved_mean", "saved_inv_std"],
            ["dx", "dscale", "dbias"],
            domain=MS,
            epsilon=1e-5,
        ),
    ]
    feeds = _feeds(inputs, overrides={"var": np.ones(channels, np.float32)})
    _check_lowering(_model(nodes, inputs, ["y", "dx", "dscale", "dbias"]), feeds)


def test_max_pool_grad_lowering_with_overlapping_windows() -> None:
    inputs = {"x": ((2, 3, 9, 9), TensorProto.FLOAT), "dy": ((2, 3, 5, 5), TensorProto.FLOAT)}
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("MaxPool", ["x"], ["y", "indices"], **attrs),
        helper.make_node("MaxPoolGrad", ["dy", "indices"], ["dx"], **attrs),
    ]
    model = _model(nodes, inputs, ["dx"])
    # ORT's MaxPoolGrad kernel takes dX's shape from the graph (it crashes without one).
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 9, 9]))
    _check_lowering(model, _feeds(inputs))


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool_grad_lowering(count_include_pad: int) -> None:
    inputs = {"dy": ((2, 3, 4, 4), TensorProto.FLOAT)}
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": count_include_pad}
    node = helper.make_node("AveragePoolGrad", ["dy"], ["dx"], **attrs)
    model = _model([node], inputs, ["dx"])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 8, 8]))
    model.graph.value_info.append(helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, 3, 8, 8]))
    _check_lowering(model, _feeds(inputs))


def test_small_training_ops_lowering() -> None:
    inputs = {
        "a": ((2, 3, 4), TensorProto.FLOAT),
        "b": ((2, 5, 4), TensorProto.FLOAT),
        "dy": ((2, 3, 4), TensorProto.FLOAT),
        "s": ((), TensorProto.FLOAT),
    }
    nodes = [
        helper.make_node("FusedMatMul", ["a", "b"], ["ab"], domain=MS, transB=1, alpha=0.5),
        helper.make_node("ReluGrad", ["dy", "a"], ["relu_dx"], domain=MS),
        helper.make_node("Scale", ["dy", "s"], ["down"], domain=MS, scale_down=1),
        # ORT's PassThrough aliases its inputs, which a graph input cannot be.
        helper.make_node("Neg", ["a"], ["neg_a"]),
        helper.make_node("Neg", ["dy"], ["neg_dy"]),
        helper.make_node("PassThrough", ["neg_a", "neg_dy"], ["a_alias", "dy_alias"], domain=MS),
        helper.make_node("Sub", ["a_alias", "dy_alias"], ["alias_difference"]),
        helper.make_node("ConcatTraining", ["a", "dy"], ["cat", "lengths"], domain=MS, axis=1),
        helper.make_node("SplitTraining", ["cat", "lengths"], ["part_a", "part_dy"], domain=MS, axis=1),
    ]
    outputs = ["ab", "relu_dx", "down", "alias_difference", "cat", "part_a", "part_dy"]
    _check_lowering(_model(nodes, inputs, outputs), _feeds(inputs, overrides={"s": np.array(4.0, np.float32)}))


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_activation_lowerings(alpha: float | None) -> None:
    inputs = {"x": ((2, 3, 5), TensorProto.FLOAT), "dy": ((2, 3, 5), TensorProto.FLOAT)}
    quick = {} if alpha is None else {"alpha": alpha}
    nodes = [
        helper.make_node("Gelu", ["x"], ["gelu"], domain=MS),
        helper.make_node("GeluGrad", ["dy", "x"], ["gelu_dx"], domain=MS),
        helper.make_node("QuickGelu", ["x"], ["quick"], domain=MS, **quick),
        helper.make_node("QuickGeluGrad", ["dy", "x"], ["quick_dx"], domain=MS, **quick),
        helper.make_node("Sigmoid", ["x"], ["sigmoid"]),
        helper.make_node("SigmoidGrad", ["dy", "sigmoid"], ["sigmoid_dx"], domain=MS),
    ]
    outputs = ["gelu", "gelu_dx", "quick", "quick_dx", "sigmoid_dx"]
    feeds = _feeds(inputs, overrides={"x": np.linspace(-6, 6, 30, dtype=np.float32).reshape(2, 3, 5)})
    _check_lowering(_model(nodes, inputs, outputs), feeds)


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_norm_grad_lowering(axis: int) -> None:
    shape = (2, 3, 4, 5)
    normalized = shape[axis:] if axis >= 0 else shape[axis:]
    inputs = {
        "x": (shape, TensorProto.FLOAT),
        "dy": (shape, TensorProto.FLOAT),
        "scale": (normalized, TensorProto.FLOAT),
        "bias": (normalized, TensorProto.FLOAT),
    }
    nodes = [
        helper.make_node(
            "LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"], axis=axis, epsilon=1e-5
        ),
        helper.make_node(
            "LayerNormalizationGrad",
            ["dy", "x", "scale", "mean", "inv_std"],
            ["dx", "dscale", "dbias"],
            domain=MS,
            axis=axis,
            epsilon=1e-5,
        ),
    ]
    _check_lowering(_model(nodes, inputs, ["dx", "dscale", "dbias"]), _feeds(inputs))


def test_an_op_without_lowering_is_named_in_one_line(tmp_path) -> None:
    from gfcompile.errors import GfError
    from gfcompile.train_step import check_standard_ops

    inputs = {"dy": ((2, 3), TensorProto.FLOAT), "x": ((2, 3), TensorProto.FLOAT)}
    # TanhGrad: no CNN of the zoo or the torchvision matrix needs it, so no lower pass handles it.
    node = helper.make_node("TanhGrad", ["dy", "x"], ["dx"], domain=MS, name="tanh_backward")
    model = run_passes(LOWER_PASSES, _model([node], inputs, ["dx"]), Plan(convs=[]), stage="lower")
    with pytest.raises(GfError, match=r"com\.microsoft::TanhGrad.*tanh_backward") as raised:
        check_standard_ops(model)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Whole models: the portable step in plain-ORT style against the training build, step by step
# ---------------------------------------------------------------------------------------------

# name -> (zoo case, input C x H x W, CompileConfig options). The filtered cases need maps of at
# least r x r at the filtered layers, hence 64 x 64 inputs for MobileNetV2.
MODES = {
    "exact": {"filter_layers": 0, "train_layers": 3},
    "filtered_r2": {"filter_layers": 2, "patch_size": 2},
    "row_tiled": {"filter_layers": 0, "train_layers": 3, "row_tiles": 2, "row_tile_trainable": True},
    "filtered_tiled": {"filter_layers": 2, "row_tiles": 2, "row_tile_trainable": True},
}
# The default run trains MobileNetV2 exact and filtered + tiled; the portable_matrix marker (deselected
# by default, `pytest -m portable_matrix tests/test_portable.py`, ~15 min on 2 cores) runs the rest.
FAST_CASES = [("mobilenet_v2", (3, 64, 64), mode) for mode in ("exact", "filtered_tiled")]
SLOW_CASES = [("mobilenet_v2", (3, 64, 64), mode) for mode in ("filtered_r2", "row_tiled")] + [
    (name, shape, mode)
    for name, shape in (("resnet18", (3, 64, 64)), ("mcunet", (3, 64, 64)), ("deeplabv3_resnet18", (3, 65, 65)))
    for mode in MODES
]
# AdamW divides each gradient element by its own magnitude, so float rounding in a near-zero
# gradient element (a different but equally exact summation order) moves that weight by up to
# lr; at lr 1e-4 three steps stay within 1e-5 of the training build. SGD propagates rounding linearly.
OPTIMIZERS = {"adamw": {"optimizer": "adamw", "lr": 1e-4}, "sgd": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}}


def compile_zoo(tmp_path, name: str, input_shape: tuple, options: dict):
    from dataclasses import replace

    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from tests.zoo_helpers import ZOO_CASES, export_case

    case = replace(ZOO_CASES[name], input_shape=input_shape)
    _, path = export_case(case, tmp_path)
    config = CompileConfig(batch_size=2, output_dir=tmp_path / "artifacts", **options)
    return case, compile_model(path, config, report=lambda message: None)


def reference_batches(case, classes: int, steps: int = 3):
    from tests.zoo_helpers import make_batch

    return [make_batch(case, 2, classes, seed=seed) for seed in range(steps)]


def assert_backends_agree(artifacts, batches, scaled: bool = False) -> tuple:
    """Loss and every trained parameter within 1e-5 of the training build after each step; with
    `scaled`, 1e-5 of the value's magnitude (the loss, or the tensor's largest entry) where that is
    above 1, as tests/test_torchvision_coverage.py compares random-weight nets whose losses reach 1e4-1e9."""
    from runtime.portable import PortableTrainer
    from runtime.trainer import Trainer

    def tolerance(expected) -> float:
        return 1e-5 * (max(1.0, float(np.max(np.abs(expected)))) if scaled else 1.0)

    training_build = Trainer(artifacts)
    assert type(training_build) is Trainer  # the training wheel is installed here
    portable = PortableTrainer(artifacts)
    for x, y in batches:
        expected_loss = training_build.train_step(x, y)
        actual_loss = portable.train_step(x, y)
        assert abs(actual_loss - expected_loss) <= tolerance(expected_loss), (actual_loss, expected_loss)
        trained = portable.parameters()
        for name in training_build.trainable:
            expected = training_build.state.parameters[name].data
            np.testing.assert_allclose(trained[name], expected, rtol=0, atol=tolerance(expected))
    return training_build, portable


@pytest.mark.parametrize(("name", "input_shape", "mode"), FAST_CASES)
def test_portable_step_matches_training_build(tmp_path, name: str, input_shape: tuple, mode: str) -> None:
    case, artifacts = compile_zoo(tmp_path, name, input_shape, {**MODES[mode], **OPTIMIZERS["adamw"]})
    step = onnx.load(str(artifacts / "train_step.onnx"), load_external_data=False)
    _standard_only(step)
    assert_backends_agree(artifacts, reference_batches(case, 10))


@pytest.mark.slow
@pytest.mark.portable_matrix
@pytest.mark.parametrize(("name", "input_shape", "mode"), SLOW_CASES)
def test_portable_step_matches_training_build_zoo(tmp_path, name: str, input_shape: tuple, mode: str) -> None:
    case, artifacts = compile_zoo(tmp_path, name, input_shape, {**MODES[mode], **OPTIMIZERS["adamw"]})
    classes = 5 if case.segmentation else 10
    assert_backends_agree(artifacts, reference_batches(case, classes))


@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.01}])
def test_portable_momentum_sgd_matches_training_build(tmp_path, extra: dict) -> None:
    options = {**MODES["filtered_r2"], **OPTIMIZERS["sgd"], **extra}
    case, artifacts = compile_zoo(tmp_path, "mobilenet_v2", (3, 64, 64), options)
    assert_backends_agree(artifacts, reference_batches(case, 10))


def test_portable_adamw_weight_decay(tmp_path) -> None:
    options = {"filter_layers": 0, "train_layers": 2, "weight_decay": 0.05, "lr": 1e-4}
    case, artifacts = compile_zoo(tmp_path, "mobilenet_v2", (3, 64, 64), options)
    assert_backends_agree(artifacts, reference_batches(case, 10))


def test_portable_train_mode_batchnorm(tmp_path) -> None:
    # SGD: through a batch-statistics BN the conv's weight gradient is a difference of nearly equal
    # terms, which AdamW's per-element normalisation would turn into lr-sized rounding differences.
    options = {"filter_layers": 0, "train_layers": 2, "bn_mode": "train", **OPTIMIZERS["sgd"]}
    case, artifacts = compile_zoo(tmp_path, "mobilenet_v2", (3, 64, 64), options)
    assert_backends_agree(artifacts, reference_batches(case, 10))


def test_portable_checkpoint_resume_export_and_nonfinite(tmp_path) -> None:
    from runtime.errors import RunError
    from runtime.portable import PortableTrainer
    from runtime.safetensors_io import read_safetensors

    case, artifacts = compile_zoo(tmp_path, "mobilenet_v2", (3, 64, 64), {**MODES["filtered_r2"], "lr": 1e-3})
    batches = reference_batches(case, 10, steps=4)
    straight = PortableTrainer(artifacts)
    for x, y in batches:
        straight.train_step(x, y)

    first = PortableTrainer(artifacts)
    for x, y in batches[:2]:
        first.train_step(x, y)
    checkpoint = tmp_path / "trained.safetensors"
    first.save(checkpoint)
    tensors, metadata = read_safetensors(checkpoint)
    assert metadata["step"] == "2" and set(first.trainable) <= set(tensors)
    resumed = PortableTrainer(artifacts, checkpoint=checkpoint)
    assert resumed.step == 2
    for x, y in batches[2:]:
        resumed.train_step(x, y)
    for name, value in straight.parameters().items():
        np.testing.assert_array_equal(resumed.parameters()[name], value)  # resuming is exact

    # A NaN batch stops before the weights change; with skip_nonfinite it is skipped.
    before = resumed.parameters()
    x, y = batches[0]
    with pytest.raises(RunError, match="step 5: the loss is nan"):
        resumed.train_step(np.full_like(x, np.nan), y)
    assert np.isnan(resumed.train_step(np.full_like(x, np.nan), y, skip_nonfinite=True))
    assert resumed.step == 5
    for name, value in before.items():
        np.testing.assert_array_equal(resumed.parameters()[name], value)

    exported = resumed.export_inference(tmp_path / "inference.onnx")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(logits, resumed.outputs(x, y)[1], rtol=1e-5, atol=1e-5)


def test_portable_backend_is_chosen_without_the_training_wheel(tmp_path) -> None:
    """In a process where onnxruntime.training cannot be imported, Trainer(...) is the portable one."""
    import subprocess
    import sys
    from pathlib import Path

    from runtime.trainer import Trainer

    case, artifacts = compile_zoo(tmp_path, "mobilenet_v2", (3, 64, 64), MODES["exact"])
    x, y = reference_batches(case, 10, steps=1)[0]
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("torch", "onnx", "onnx_graphsurgeon") or name.startswith("onnxruntime.training"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
import numpy as np
from runtime.trainer import Trainer
trainer = Trainer({str(artifacts)!r})
batch = np.load({str(tmp_path / "batch.npz")!r})
print(type(trainer).__name__, trainer.train_step(batch["x"], batch["y"]))
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    kind, loss = result.stdout.split()
    expected = Trainer(artifacts).train_step(x, y)  # the training build, in this process
    assert kind == "PortableTrainer"
    assert float(loss) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Other environments: the newest onnxruntime on Python 3.13, and onnxruntime-node
# ---------------------------------------------------------------------------------------------


def training_build_run(artifacts, batches) -> tuple[list[float], dict[str, np.ndarray]]:
    from runtime.trainer import Trainer

    trainer = Trainer(artifacts)
    losses = [trainer.train_step(x, y) for x, y in batches]
    return losses, {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


def _clean_env() -> dict[str, str]:
    import os

    # As tests/test_plain_onnxruntime.py: nothing of this session's Python environment leaks in.
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def _python313():
    from pathlib import Path

    found = sorted(Path.home().glob(".pyenv/versions/3.13*/bin/python"))
    if not found:
        pytest.skip("no Python 3.13 under ~/.pyenv")
    return found[-1]


@pytest.mark.slow
def test_portable_artifacts_train_on_newest_onnxruntime_python313(tmp_path) -> None:
    """A throwaway Python 3.13 venv with the newest plain onnxruntime (no training build, no torch,
    no onnx) trains the artifacts of each mode with the runtime package and matches the training build."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = []
    for mode, options in MODES.items():
        case, artifacts = compile_zoo(tmp_path / mode, "mobilenet_v2", (3, 64, 64), {**options, **OPTIMIZERS["adamw"]})
        batches = reference_batches(case, 10)
        np.savez(
            tmp_path / mode / "batches.npz",
            **{f"{k}{i}": v for i, b in enumerate(batches) for k, v in zip("xy", b, strict=True)},
        )
        runs.append((mode, artifacts, batches))

    env_dir = tmp_path / "py313"
    subprocess.run([str(_python313()), "-m", "venv", str(env_dir)], check=True, env=_clean_env())
    python = env_dir / "bin" / "python"
    # The README's Deploy step: plain onnxruntime, numpy and the runtime package (from a copy of its
    # source, so no build/ folder lands in the checkout), nothing else.
    import shutil

    runtime_source = tmp_path / "runtime_source"
    shutil.copytree(
        root / "runtime", runtime_source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    install = subprocess.run(
        [str(python), "-I", "-m", "pip", "install", "--quiet", "onnxruntime", "numpy", str(runtime_source)],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr[-2000:]
    script = f"""
import importlib.util, json, sys
import numpy as np
import onnxruntime, runtime
from runtime.trainer import Trainer
report = {{"python": sys.version_info[:2], "onnxruntime": onnxruntime.__version__, "module": onnxruntime.__file__,
          "runtime": runtime.__file__,
          "blocked": [m for m in ("onnxruntime.training", "torch", "onnx") if importlib.util.find_spec(m) is not None]}}
for mode, artifacts in {[(mode, str(a)) for mode, a, _ in runs]!r}:
    trainer = Trainer(artifacts)
    report[mode] = type(trainer).__name__
    batches = np.load(artifacts + "/../batches.npz")
    losses = [trainer.train_step(batches[f"x{{i}}"], batches[f"y{{i}}"]) for i in range(3)]
    np.savez(artifacts + "/../plain.npz", losses=np.array(losses), **trainer.parameters())
print(json.dumps(report))
"""
    result = subprocess.run([str(python), "-I", "-c", script], capture_output=True, text=True, env=_clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # A device bundle of the same artifacts trains there with the unchanged runner (gftrain), resumes
    # from its checkpoint and exports an inference model.
    from gfcompile.bundle import make_bundle

    bundle = tmp_path / "bundle"
    make_bundle(runs[1][1], bundle)
    x, y = zip(*runs[1][2], strict=True)
    np.savez(tmp_path / "data.npz", x=np.concatenate(x), y=np.concatenate(y))
    for steps in (2, 4):
        argv = [
            str(bundle),
            "--data",
            str(tmp_path / "data.npz"),
            "--steps",
            str(steps),
            "--export",
            str(tmp_path / "m.onnx"),
        ]
        device = subprocess.run(
            [str(env_dir / "bin" / "gftrain"), *argv], capture_output=True, text=True, env=_clean_env()
        )
        assert device.returncode == 0, device.stderr[-3000:]
        assert f"step {steps};" in device.stdout
    assert "resuming from" in device.stderr and (tmp_path / "m.onnx").is_file()
    assert report["python"] == [3, 13] and not report["blocked"], report
    assert Path(report["module"]).resolve().is_relative_to(env_dir.resolve()), report
    assert Path(report["runtime"]).resolve().is_relative_to(env_dir.resolve()), report
    for mode, artifacts, batches in runs:
        assert report[mode] == "PortableTrainer"
        losses, params = training_build_run(artifacts, batches)
        with np.load(tmp_path / mode / "plain.npz") as plain:
            np.testing.assert_allclose(plain["losses"], losses, rtol=0, atol=1e-5)
            for name, value in params.items():
                np.testing.assert_allclose(plain[name], value, rtol=0, atol=1e-5, err_msg=f"{mode}: {name}")


@pytest.mark.slow
def test_node_train_step_matches_training_build(tmp_path) -> None:
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from runtime.safetensors_io import read_safetensors, write_safetensors

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    modules = tmp_path / "node"
    modules.mkdir()
    (modules / "package.json").write_text('{"name": "gfcompile-node-check", "private": true}')
    # The package's install script would fetch CUDA binaries; its CPU binaries ship in the package.
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip", "ONNXRUNTIME_NODE_INSTALL": "skip"}
    install = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "onnxruntime-node"],
        cwd=modules,
        capture_output=True,
        text=True,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    case, artifacts = compile_zoo(
        tmp_path, "mobilenet_v2", (3, 64, 64), {**MODES["filtered_tiled"], **OPTIMIZERS["adamw"]}
    )
    batches = reference_batches(case, 10)
    write_safetensors(
        tmp_path / "batches.safetensors",
        {f"{k}{i}": v for i, b in enumerate(batches) for k, v in zip("xy", b, strict=True)},
        {},
    )
    script = Path(__file__).resolve().parents[1] / "scripts" / "node_train_step.mjs"
    result = subprocess.run(
        ["node", str(script), str(artifacts), str(tmp_path / "batches.safetensors"), str(tmp_path / "node.safetensors")]
        + ["--modules", str(modules)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    trained, _ = read_safetensors(tmp_path / "node.safetensors")
    losses, params = training_build_run(artifacts, batches)
    np.testing.assert_allclose(trained["loss"], losses, rtol=0, atol=1e-5)
    for name, value in params.items():
        np.testing.assert_allclose(trained[name], value, rtol=0, atol=1e-5, err_msg=name)


def test_safetensors_files_follow_the_format(tmp_path) -> None:
    """Our reader takes a file built by hand from the published layout, and our writer writes that layout."""
    import json
    import struct

    from runtime.errors import RunError
    from runtime.safetensors_io import read_safetensors, write_safetensors

    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {"step": "7"}}
    )
    (tmp_path / "hand.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + weights.tobytes())
    tensors, metadata = read_safetensors(tmp_path / "hand.safetensors")
    np.testing.assert_array_equal(tensors["w"], weights)
    assert metadata == {"step": "7"}

    write_safetensors(tmp_path / "ours.safetensors", {"w": weights, "b": np.ones(4, np.float32)}, {"step": "3"})
    raw = (tmp_path / "ours.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + length])
    begin, end = entries["w"]["data_offsets"]
    assert entries["w"]["dtype"] == "F32" and entries["__metadata__"] == {"step": "3"}
    np.testing.assert_array_equal(
        np.frombuffer(raw[8 + length + begin : 8 + length + end], "<f4").reshape(2, 3), weights
    )

    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 5])
    with pytest.raises(RunError, match="not a valid safetensors checkpoint") as raised:
        read_safetensors(tmp_path / "cut.safetensors")
    assert "\n" not in str(raised.value)
