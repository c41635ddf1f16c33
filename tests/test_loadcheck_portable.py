"""The load check opens the portable models too (gfcompile/loadcheck.py).

A real compile (with a feature-cache tail, whose portable models are checked as well) passes; a copy
of its artifacts with one hand-broken portable model is refused in one line that names the file:
a com.microsoft training op (which this venv's training-build onnxruntime would load), a truncated
file, a graph that strict shape inference rejects, and an op onnxruntime has no CPU kernel for.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.loadcheck import check_portable_loadable, portable_models
from gfcompile.pipeline import compile_model
from passes.base import Plan
from runtime.manifest import read_manifest
from tests.tiny_models import save, tiny_cnn

BATCH = 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """Artifacts whose compile ran the check (it would have raised otherwise)."""
    folder = tmp_path_factory.mktemp("loadcheck")
    model = save(tiny_cnn(batch=BATCH), folder / "tiny.onnx")
    config = CompileConfig(
        batch_size=BATCH, filter_layers=0, train_layers=1, feature_cache=True, output_dir=folder / "a"
    )
    return compile_model(Path(model), config, report=lambda message: None)


def _check(directory: Path) -> None:
    # The forward model only names nodes in ORT's messages; the eval model has the same node names.
    forward = onnx.load(str(directory / "eval_model.onnx"), load_external_data=False)
    check_portable_loadable(directory, forward, Plan(convs=[]))


def test_a_real_compile_passes_and_every_portable_model_is_checked(compiled: Path) -> None:
    manifest = read_manifest(compiled)
    tail = manifest.feature_cache.tail
    expected = {
        manifest.portable.train_step,
        manifest.portable.eval_step,
        manifest.portable.inference_template,
        manifest.feature_cache.prefix_model,
        f"{tail}/train_step.onnx",
        f"{tail}/eval_step.onnx",
        f"{tail}/inference_template.onnx",
    }
    assert {str(path.relative_to(compiled)) for path in portable_models(compiled)} == expected
    _check(compiled)


def _edit(path: Path, change: Callable[[onnx.GraphProto], None], opsets: dict[str, int] | None = None) -> None:
    """Rewrite the model at `path` with `change` applied; external data stays where it is."""
    model = onnx.load(str(path), load_external_data=False)
    change(model.graph)
    for domain, version in (opsets or {}).items():
        model.opset_import.append(helper.make_opsetid(domain, version))
    onnx.save(model, str(path))


def _training_op(graph: onnx.GraphProto) -> None:
    """The first node's first output goes through com.microsoft's PassThrough (ORT's ordering barrier)."""
    produced = graph.node[0].output[0]
    for node in graph.node:
        node.input[:] = [f"{produced}/barrier" if name == produced else name for name in node.input]
    graph.node.insert(
        1, helper.make_node("PassThrough", [produced], [f"{produced}/barrier"], name="injected", domain="com.microsoft")
    )


def _bad_shapes(graph: onnx.GraphProto) -> None:
    graph.initializer.extend(
        [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in (("a", (2, 3)), ("b", (4, 5)))]
    )
    graph.node.append(helper.make_node("MatMul", ["a", "b"], ["ab"], name="injected"))
    graph.output.append(helper.make_tensor_value_info("ab", TensorProto.FLOAT, [2, 5]))


def _no_cpu_kernel(graph: onnx.GraphProto) -> None:
    # Valid ONNX (Add takes uint16), but onnxruntime's CPU Add has no uint16 kernel.
    graph.initializer.append(numpy_helper.from_array(np.ones(3, np.uint16), "u"))
    graph.node.append(helper.make_node("Add", ["u", "u"], ["uu"], name="injected"))
    graph.output.append(helper.make_tensor_value_info("uu", TensorProto.UINT16, [3]))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKS = {
    # case: (file, how it is broken, what the one line says); {tail} is the feature-cache tail's folder
    "training_op": (
        "train_step.onnx",
        lambda path: _edit(path, _training_op, {"com.microsoft": 1}),
        r"the portable model train_step\.onnx is not standard ONNX: .*com\.microsoft::PassThrough \(node 'injected'\)",
    ),
    "training_op_in_tail": (
        "{tail}/train_step.onnx",
        lambda path: _edit(path, _training_op, {"com.microsoft": 1}),
        r"the portable model {tail}/train_step\.onnx is not standard ONNX: .*PassThrough",
    ),
    "truncated": ("eval_step.onnx", _truncate, r"the portable model eval_step\.onnx cannot be read as ONNX: "),
    "bad_shapes": (
        "train_step.onnx",
        lambda path: _edit(path, _bad_shapes),
        r"train_step\.onnx fails the ONNX checker: .*node name: injected.*Incompatible dimensions",
    ),
    "no_cpu_kernel": (
        "inference_template.onnx",
        lambda path: _edit(path, _no_cpu_kernel),
        r"the portable model inference_template\.onnx does not load in onnxruntime: node 'injected' \(Add",
    ),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_broken_portable_model_is_refused_in_one_line(compiled: Path, tmp_path: Path, case: str) -> None:
    file, breaking, message = BREAKS[case]
    tail = read_manifest(compiled).feature_cache.tail
    file, message = file.format(tail=tail), message.format(tail=tail)
    broken = tmp_path / "artifacts"
    shutil.copytree(compiled, broken)
    breaking(broken / file)
    with pytest.raises(GfError, match=message) as raised:
        _check(broken)
    assert "\n" not in str(raised.value)


def test_the_training_op_check_is_needed_here(compiled: Path, tmp_path: Path) -> None:
    """This venv's onnxruntime (the training build) opens a train step holding PassThrough, so only
    the op check keeps such a model from reaching plain onnxruntime, which refuses it."""
    broken = tmp_path / "artifacts"
    shutil.copytree(compiled, broken)
    _edit(broken / "train_step.onnx", _training_op, {"com.microsoft": 1})
    ort.InferenceSession(str(broken / "train_step.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(GfError, match="PassThrough"):
        _check(broken)
