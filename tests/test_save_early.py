"""save_early: the pooled inputs and ReLU masks are computed before the full-resolution tensor's forward readers.

ORT runs them in the backward otherwise (its default order emits a node when its first reader
needs it), which keeps the full-resolution activation alive through the backward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx

from gfcompile.backward import build_backward
from gfcompile.config import CompileConfig
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.passrunner import run_passes
from gfcompile.pipeline import FORWARD_PASSES
from gfcompile.planning import select_layers
from passes import activation_mask, gradient_filter, gradient_filter_fusion, save_early
from passes.names import X_POOL
from runtime.ort_training import training_api
from tests.zoo_helpers import ZOO_CASES, export_case, make_batch, relative_error

TOL = 1e-6


def _run(directory: Path, training: onnx.ModelProto, name: str, batch, params: list[str], profile: bool):
    import onnxruntime as ort

    path = directory / name
    onnx.save(training, str(path))
    api = training_api()
    options = ort.SessionOptions()
    options.enable_profiling = profile
    options.profile_file_prefix = str(directory / f"{name}.prof")
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(path), state, None, device="cpu", session_options=options)
    module.train()
    module(*batch)
    del module  # writes the profile
    return {p: state.parameters[p].grad.copy() for p in params}


def test_pooled_inputs_run_before_the_filtered_convs(tmp_path: Path) -> None:
    case = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, 64, 64))
    _, onnx_path = export_case(case, tmp_path)
    config = CompileConfig(filter_layers=3, batch_size=2)
    model = pin_shapes(load_and_validate(onnx_path), config)
    plan = select_layers(model, config)
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    train = build_backward(forward, plan, config, tmp_path / "artifacts")
    base = (gradient_filter, gradient_filter_fusion, activation_mask)
    before = run_passes(base, train.training, plan, stage="training")
    after = run_passes((*base, save_early), train.training, plan, stage="training")
    onnx.checker.check_model(after, full_check=True)

    barriers = {n.input[0]: n for n in after.graph.node if n.op_type == "PassThrough"}
    for conv in plan.filtered:
        layer = plan.conv(conv)
        barrier = barriers[layer.input]
        assert plan.generated.filter_tensor(conv, X_POOL) in barrier.input
        conv_node = next(n for n in after.graph.node if n.name == conv)
        assert conv_node.input[0] == barrier.output[0]  # the conv waits for x~

    batch = make_batch(case, 2, 10)
    expected = _run(train.directory, before, "before.onnx", batch, plan.trainable_params, profile=False)
    actual = _run(train.directory, after, "after.onnx", batch, plan.trainable_params, profile=True)
    for name in plan.trainable_params:
        assert np.abs(expected[name]).max() > 0, name
        assert relative_error(actual[name], expected[name]) <= TOL, name

    # ORT's own execution order: each x~ finishes before its conv runs (not in the backward).
    (profile,) = train.directory.glob("after.onnx.prof*.json")
    order = [e["name"].removesuffix("_kernel_time") for e in json.loads(profile.read_text()) if e.get("cat") == "Node"]
    order = [name for name in order if not name.endswith(("_fence_before", "_fence_after"))]
    for conv in plan.filtered:
        x_pool = plan.generated.filter_tensor(conv, X_POOL)
        pool_steps = [i for i, name in enumerate(order) if name.startswith(x_pool)]
        assert pool_steps and max(pool_steps) < order.index(conv), conv
