"""The ReLU-mask pass: exact gradients, and the fp32 ReLU output has no backward reader left."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gfcompile.backward import build_backward
from gfcompile.config import CompileConfig
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.passrunner import run_passes
from gfcompile.pipeline import FORWARD_PASSES
from gfcompile.planning import select_layers
from passes import activation_mask, gradient_filter
from passes.graph_utils import gradient_dependent_nodes
from runtime.ort_training import training_api
from tests.zoo_helpers import ZOO_CASES, export_case, make_batch, relative_error


def _gradients(artifacts: Path, training: onnx.ModelProto, trainable: list[str], x, y) -> dict[str, np.ndarray]:
    path = artifacts / "candidate_training.onnx"
    onnx.save(training, str(path))
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(artifacts / "checkpoint"))
    module = api.Module(str(path), state, str(artifacts / "eval_model.onnx"))
    module.train()
    module(x, y)
    return {name: state.parameters[name].grad.copy() for name in trainable}


def test_relu_mask_is_exact_and_frees_the_activation(tmp_path: Path) -> None:
    case = dataclasses.replace(ZOO_CASES["resnet18"], input_shape=(3, 64, 64))
    _, onnx_path = export_case(case, tmp_path)
    config = CompileConfig(filter_layers=3, batch_size=2)
    model = pin_shapes(load_and_validate(onnx_path), config)
    plan = select_layers(model, config)
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    train = build_backward(forward, plan, config, tmp_path / "artifacts")
    filtered_only = run_passes((gradient_filter,), train.training, plan, stage="training")
    masked = run_passes((gradient_filter, activation_mask), train.training, plan, stage="training")

    ops = [node.op_type for node in masked.graph.node]
    assert "ReluGrad" in [node.op_type for node in filtered_only.graph.node]
    assert ops.count("Where") >= 1 and ops.count("Greater") == ops.count("Where")

    # Every ReLU output that got a mask is read by no backward node any more.
    graph = gs.import_onnx(masked)
    backward = gradient_dependent_nodes(graph)
    tensors = graph.tensors()
    for node in graph.nodes:
        if node.op == "Greater" and node.outputs[0].name.endswith("/relu_mask"):
            activation = tensors[node.inputs[0].name]
            assert not [c.op for c in activation.outputs if id(c) in backward], activation.name
            assert node.outputs[0].dtype == np.bool_

    x, y = make_batch(case, 2, 10)
    expected = _gradients(train.directory, filtered_only, plan.trainable_params, x, y)
    actual = _gradients(train.directory, masked, plan.trainable_params, x, y)
    for name in plan.trainable_params:
        assert relative_error(actual[name], expected[name]) <= 1e-6, name


def test_clip_masks_stay_bool_and_gradients_are_exact(tmp_path: Path) -> None:
    case = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, 64, 64))
    _, onnx_path = export_case(case, tmp_path)
    config = CompileConfig(filter_layers=2, train_layers=4, batch_size=2)
    model = pin_shapes(load_and_validate(onnx_path), config)
    plan = select_layers(model, config)
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    train = build_backward(forward, plan, config, tmp_path / "artifacts")
    before = run_passes((gradient_filter,), train.training, plan, stage="training")
    after = run_passes((gradient_filter, activation_mask), train.training, plan, stage="training")

    def float_masks(model: onnx.ModelProto) -> list[str]:
        return [n.name for n in model.graph.node if n.op_type == "Cast" and "Clip_Grad" in n.name]

    # ReLU6 (Clip) gradients: ORT keeps Cast(mask, float) alive for the backward; after the pass
    # the bool mask feeds a Where instead and no float mask is left.
    assert float_masks(before) and not float_masks(after)
    x, y = make_batch(case, 2, 10)
    expected = _gradients(train.directory, before, plan.trainable_params, x, y)
    actual = _gradients(train.directory, after, plan.trainable_params, x, y)
    for name in plan.trainable_params:
        assert relative_error(actual[name], expected[name]) <= 1e-6, name
