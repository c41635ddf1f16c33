"""The portable train step keeps save_early's order on plain onnxruntime, exactly and for free.

save_early's PassThrough barriers make ORT compute the pooled inputs and ReLU masks during the
forward. The lowering replaces each by a Reshape of x whose shape reads an empty slice of every
summary (passes/lower_training_ops.py). Checked on ORT's own execution order (its profiler) and its
optimized graph: with the lowered barrier every summary is finished before the first backward
node; with the barrier turned into an Identity (what lowering PassThrough to Identity nodes gave)
some summary runs inside the backward; and both steps return bitwise the same values.
`python -m benchmarks.portable_order` measures the peak memory this is about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.portable_order import (
    IDENTITY_STEP,
    backward_node_names,
    order_barriers,
    summaries_in_forward,
    summary_chains,
    with_identity_barriers,
)
from tests.tiny_models import ConvSpec, save, tiny_cnn

BATCH = 2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model

    folder = tmp_path_factory.mktemp("order")
    model = tiny_cnn(convs=[ConvSpec(8), ConvSpec(16), ConvSpec(16), ConvSpec(16)], input_shape=(3, 32, 32))
    path = Path(save(model, folder / "tiny.onnx"))
    config = CompileConfig(filter_layers=2, train_layers=3, batch_size=BATCH, output_dir=folder / "artifacts")
    artifacts = compile_model(path, config, report=lambda message: None)
    step = onnx.load(str(artifacts / "train_step.onnx"), load_external_data=False)
    onnx.save(with_identity_barriers(step), str(artifacts / IDENTITY_STEP))
    return artifacts


def _session(artifacts: Path, name: str, profile_prefix: Path | None = None, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(artifacts / name), options, providers=["CPUExecutionProvider"])


def _feeds(session) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        if value.type == "tensor(int64)":
            high = 5 if value.shape else 1  # labels: tiny_cnn's 5 classes; the step counter: 0
            feeds[value.name] = rng.integers(0, high, size=value.shape).astype(np.int64)
        else:
            feeds[value.name] = np.asarray(np.abs(0.1 * rng.standard_normal(value.shape)), np.float32)  # v >= 0: sqrt
    return feeds


def _profiled_order(artifacts: Path, name: str, tmp_path: Path) -> list[str]:
    import json

    session = _session(artifacts, name, profile_prefix=tmp_path / name)
    session.run(None, _feeds(session))
    events = json.loads(Path(session.end_profiling()).read_text())
    order = [e["name"].removesuffix("_kernel_time") for e in events if e.get("cat") == "Node"]
    return [n for n in order if not n.endswith(("_fence_before", "_fence_after"))]


def test_lowered_barriers_keep_summaries_in_the_forward(artifacts: Path, tmp_path: Path) -> None:
    training = onnx.load(str(artifacts / "training_model.onnx"), load_external_data=False)
    step = onnx.load(str(artifacts / "train_step.onnx"), load_external_data=False)
    passthroughs = [n for n in training.graph.node if n.op_type == "PassThrough"]
    assert passthroughs, "save_early inserted no barrier: the case tests nothing"
    assert len(order_barriers(step)) == len(passthroughs)
    assert all(node.domain in ("", "ai.onnx") for node in step.graph.node)

    # ORT's optimizer keeps every ordering Reshape (it folds an Identity away).
    _session(artifacts, "train_step.onnx", optimized=tmp_path / "optimized.onnx")
    optimized = {n.name for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {n.name for n in order_barriers(step)} <= optimized

    chains = summary_chains(training)
    backward = backward_node_names(step)
    done, found = summaries_in_forward(_profiled_order(artifacts, "train_step.onnx", tmp_path), chains, backward)
    assert found == len(chains) and done == found, (done, found)
    done, found = summaries_in_forward(_profiled_order(artifacts, IDENTITY_STEP, tmp_path), chains, backward)
    assert found == len(chains) and done < found, "without the barrier ORT ran every summary in the forward anyway"


def test_lowered_barriers_change_no_value(artifacts: Path) -> None:
    ordered, identity = _session(artifacts, "train_step.onnx"), _session(artifacts, IDENTITY_STEP)
    feeds = _feeds(ordered)
    for name, expected, actual in zip(
        [o.name for o in ordered.get_outputs()], identity.run(None, feeds), ordered.run(None, feeds), strict=True
    ):
        assert np.array_equal(actual, expected), name
