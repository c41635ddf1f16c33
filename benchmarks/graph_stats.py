"""Static view of a compiled training graph: which forward tensors the backward reads.

Those tensors are what ORT must keep alive from the forward into the backward, so they
explain a measured peak better than the conv-input count of the paper's table: a ReLU6
gradient reading the fp32 pre-activation keeps a full-resolution tensor alive even when the
conv after it no longer needs its input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def saved_for_backward(training_model: Path, min_bytes: int = 0) -> dict[str, Any]:
    """Forward tensors read by backward nodes, with static shapes, bytes and readers (largest first).

    Backward nodes are those that (transitively) read a gradient tensor; a forward tensor is
    one that no backward node produces and that is not an initializer or graph input.
    """
    import numpy as np
    import onnx
    from onnx import helper, shape_inference

    from gfcompile.inspection import backward_nodes

    model = onnx.load(str(training_model), load_external_data=False)
    # ORT's contrib ops are unknown to onnx's inference; the forward part (standard ops) is typed.
    inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type for v in [*graph.input, *graph.value_info, *graph.output]}
    constants = {init.name for init in graph.initializer} | {v.name for v in graph.input}

    backward = sorted(backward_nodes(graph))
    produced_by_backward = {name for index in backward for name in graph.node[index].output}

    saved: dict[str, dict[str, Any]] = {}
    for index in backward:
        node = graph.node[index]
        for name in node.input:
            if not name or name in constants or name in produced_by_backward:
                continue
            entry = saved.setdefault(name, {"name": name, "shape": None, "bytes": None, "readers": []})
            entry["readers"].append(f"{node.op_type} {node.name}")
            tensor_type = types.get(name)
            if entry["shape"] is None and tensor_type is not None and tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
                entry["shape"] = dims
                if all(d is not None for d in dims):
                    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
                    entry["bytes"] = int(np.prod(dims, dtype=np.int64)) * itemsize
    tensors = sorted(saved.values(), key=lambda e: -(e["bytes"] or 0))
    return {
        "total_bytes": sum(e["bytes"] or 0 for e in tensors),
        "untyped": [e["name"] for e in tensors if e["bytes"] is None],
        "tensors": [e for e in tensors if (e["bytes"] or 0) >= min_bytes or e["bytes"] is None],
    }
