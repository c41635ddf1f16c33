"""passes/emitter.py: what the emitted graphs declare must pass ONNX's strict shape inference, which
the load check runs on every portable model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from passes.emitter import Emitter
from passes.names import NameAllocator


@pytest.mark.parametrize(("source_shape", "target"), [((2, 3, 4, 4), [-1]), ((2, 3, 4, 4), [2, -1])])
def test_reshape_declares_what_strict_inference_infers(source_shape, target) -> None:
    source = gs.Variable("x", dtype=np.float32, shape=list(source_shape))
    graph = gs.Graph(inputs=[source], opset=17)
    emit = Emitter(graph, NameAllocator(graph), "lowered")
    flat = emit.reshape("flat", source, target)
    graph.outputs = [flat]
    model = gs.export_onnx(graph)
    assert -1 not in (flat.shape or [])
    onnx.checker.check_model(model, full_check=True)  # a declared -1 fails: "existing shape differ"
    assert int(np.prod(flat.shape)) == int(np.prod(source_shape))
