"""Running an ordered list of passes: the only place that converts ModelProto <-> gs.Graph."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

import onnx
import onnx_graphsurgeon as gs

from passes.base import FACTS, Plan

from .errors import GfError


def pass_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def run_passes(passes: Sequence[ModuleType], model: onnx.ModelProto, plan: Plan, stage: str) -> onnx.ModelProto:
    for module in passes:
        if stage != module.STAGE:
            raise GfError(f"internal: pass {pass_name(module)} is a {module.STAGE} pass, run in the {stage} stage")
        _check_requirements(module, model)
        with _recursion_for(model):
            try:
                graph = module.run(gs.import_onnx(model), plan)
            except ValueError as exc:  # passes refuse configurations they cannot rewrite with ValueError
                raise GfError(f"{pass_name(module)}: {exc}") from None
            graph.cleanup().toposort()
        model = _export_like(graph, model)
    return model


@contextlib.contextmanager
def _recursion_for(model: onnx.ModelProto) -> Iterator[None]:
    """onnx-graphsurgeon's toposort recurses once per graph level: deep row-tiled training graphs
    (VGG-16 with 32 bands) exceed Python's default limit of 1000 frames."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, 4 * len(model.graph.node) + 1000))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def _export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    exported = gs.export_onnx(graph, do_type_check=False)
    exported.ir_version = original.ir_version
    del exported.opset_import[:]
    exported.opset_import.extend(original.opset_import)
    exported.producer_name = original.producer_name
    exported.producer_version = original.producer_version
    del exported.metadata_props[:]
    exported.metadata_props.extend(original.metadata_props)
    return exported


def _check_requirements(module: ModuleType, model: onnx.ModelProto) -> None:
    for fact in module.REQUIRES:
        if fact not in FACTS:
            raise GfError(f"internal: pass {pass_name(module)} requires unknown fact {fact!r}")
        if fact == "static_shapes":
            for value in model.graph.input:
                dims = value.type.tensor_type.shape.dim
                if any(not d.HasField("dim_value") for d in dims):
                    raise GfError(f"internal: pass {pass_name(module)} needs static shapes; {value.name} is dynamic")
        elif fact == "ort_gradient_graph" and not any(
            node.domain == "com.microsoft" or node.op_type.endswith("Grad") for node in model.graph.node
        ):
            raise GfError(f"internal: pass {pass_name(module)} runs on a training graph only")
