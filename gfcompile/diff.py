"""Structural diff of compiled graphs: `gfcompile diff A B`, and the golden snapshots the tests keep.

Everything is compared in a canonical form, so two graphs that differ only in the names of their
internal tensors (or in the file order of their nodes) compare equal:

* Nodes are ordered by a depth-first post-order walk from the graph outputs, visiting each node's
  inputs in slot order. That order depends only on the graph's structure, the order of its outputs
  and the input slots, never on tensor names or where a node sits in the file.
* Node ``k`` in that order is ``n<k>``; its outputs are ``%n<k>`` (output 0) and ``%n<k>.<j>``
  (``%`` keeps these apart from any user name).
* Names that users see and that stay put are kept: graph inputs and outputs (the data, labels,
  the parameters of ORT's training graphs, the gradient outputs) and initializers that sit in a
  parameter slot (a Conv or Gemm weight, a BatchNorm statistic). Every other
  initializer is a constant named after its first reader: ``%c<k>.<slot>``. Names that ORT's block
  builder numbers with a per-process counter (``onnx::loss::2``) are internal too.
* Constant and parameter values appear only as a short sha256 plus statistics (small integer
  tensors, e.g. shapes, also with their values), so snapshots stay small. When two live models
  are compared, values are compared with ``--atol``; when one side is a snapshot, by hash and then
  by the statistics within ``--atol``.

Subgraphs (If/Loop bodies) compare by a hash of their own canonical form; tensors they capture from
the outer graph keep their names there (the zoo's CNNs have none).

An artifacts folder is compared model by model (training, eval, optimizer), plus the manifest
(minus what only records where things were written) and the parameter values in the checkpoint.

The node diff aligns the two canonical node lists like a text diff (``difflib``), keyed by op and
parameter names, then reports nodes added, removed and changed (op, attributes, input/output
types, and which tensors feed them).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime import manifest as runtime_manifest
from runtime.errors import RunError
from runtime.manifest import MANIFEST, Manifest, nesting_depth

from .errors import GfError
from .planning import BN_STATISTICS_INPUTS, PARAMETER_INPUTS

SNAPSHOT_FORMAT = "gfcompile-snapshot/1"
# Snapshots nest about 8 levels (model, nodes, attributes); deeper input would recurse past the stack in compare().
MAX_SNAPSHOT_NESTING = 64
MODEL_FILES = ("training_model", "eval_model", "optimizer_model")
# Manifest entries that record where and when things were written, not what was compiled. `files` holds
# the file hashes; the files themselves are compared in canonical form instead.
VOLATILE_MANIFEST_KEYS = ("files", "source.path", "config.output_dir", "config.force", "bundle")
SMALL_TENSOR = 16  # tensors up to this many elements keep their values in the snapshot (shape constants)
HASH_CHARS = 16
GENERATED_NAME = re.compile(r"^onnx::.*::\d+$")


@dataclass
class Snapshot:
    """The canonical form of an .onnx model or an artifacts folder, and the live values behind it."""

    source: str
    data: dict
    # "<section>/<name>" -> values, for live models only (a snapshot read from JSON has hashes and stats).
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.data["kind"]


@dataclass
class Difference:
    section: str  # "manifest", "parameters", or a model: "model", "training_model", ...
    kind: (
        str  # op_count, node_added, node_removed, node_changed, input, output, initializer, model, manifest, parameter
    )
    item: str
    detail: str

    def to_json(self) -> dict:
        return {"section": self.section, "kind": self.kind, "item": self.item, "detail": self.detail}


@dataclass
class DiffReport:
    a: str
    b: str
    atol: float
    sections: list[str]
    differences: list[Difference]

    @property
    def equal(self) -> bool:
        return not self.differences

    def to_json(self) -> dict:
        by_section = {
            name: [d.to_json() for d in self.differences if d.section == name]
            for name in self.sections
            if any(d.section == name for d in self.differences)
        }
        return {
            "equal": self.equal,
            "a": self.a,
            "b": self.b,
            "atol": self.atol,
            "compared": self.sections,
            "differences": by_section,
        }


# --------------------------------------------------------------------------------------------------
# Canonical form


def tensor_summary(array: np.ndarray) -> dict:
    """dtype, shape, a short content hash and statistics: what a snapshot keeps of a tensor."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    summary: dict[str, Any] = {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "sha256": digest.hexdigest()[:HASH_CHARS],
    }
    if array.size and (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        values = array.astype(np.float64)
        if array.size <= SMALL_TENSOR:
            summary["values"] = [_round(v) for v in values.ravel()]
        else:
            summary["stats"] = [_round(values.mean()), _round(values.std()), _round(values.min()), _round(values.max())]
    return summary


def _round(value: float) -> float | int:
    # 7 significant digits: float32 precision, so snapshots do not churn on the last bits.
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.7g}")


def _type_string(type_proto: onnx.TypeProto | None) -> str:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return "?"
    tensor = type_proto.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    if not tensor.HasField("shape"):
        return f"{dtype}[?]"
    dims = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(str(dim.dim_value))
        elif dim.dim_param and not dim.dim_param.startswith("unk__"):
            dims.append(dim.dim_param)  # a user-visible symbol such as "batch"
        else:
            dims.append("?")
    return f"{dtype}[{','.join(dims)}]"


def _initializer_type(init: onnx.TensorProto) -> str:
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type).name
    return f"{dtype}[{','.join(str(d) for d in init.dims)}]"


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every tensor the model declares or onnx's shape inference can work out."""
    graph = model.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    produced = {name for node in graph.node for name in node.output if name}
    typed = {value.name for value in values}
    if produced - typed:
        # ORT's training graphs leave some tensors untyped; onnx's inference fills the standard-op ones.
        # It walks nodes in file order, so it runs on a copy sorted topologically.
        ordered = onnx.ModelProto()
        ordered.CopyFrom(model)
        del ordered.graph.node[:]
        ordered.graph.node.extend(graph.node[index] for index in canonical_order(graph))
        try:
            inferred = onnx.shape_inference.infer_shapes(ordered, strict_mode=False)
            values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
        except Exception:  # inference is a nicety here; untyped tensors show as "?"
            pass
    return {value.name: value.type for value in values}


def _tensor_types(model: onnx.ModelProto) -> dict[str, str]:
    types = {name: _type_string(type_proto) for name, type_proto in value_types(model).items()}
    for init in model.graph.initializer:
        types[init.name] = _initializer_type(init)
    return types


def canonical_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in depth-first post-order from the graph outputs (inputs visited in slot order)."""
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    order: list[int] = []
    state: dict[int, int] = {}  # 1: on the stack, 2: emitted

    def visit(root: int) -> None:
        if root in state:
            return
        state[root] = 1
        stack = [(root, 0)]
        while stack:  # iterative: training graphs are deep enough to hit Python's recursion limit
            index, position = stack.pop()
            inputs = nodes[index].input
            while position < len(inputs):
                parent = producer.get(inputs[position])
                position += 1
                if parent is not None and parent not in state:
                    stack.append((index, position))
                    state[parent] = 1
                    stack.append((parent, 0))
                    break
            else:
                state[index] = 2
                order.append(index)

    for output in graph.output:
        if output.name in producer:
            visit(producer[output.name])
    for index in range(len(nodes)):  # dead nodes (cleanup removes them, but a user model may have some)
        visit(index)
    return order


def _generated(name: str) -> bool:
    """ORT's block builder names tensors "onnx::<what>::<counter>"; the counter runs per process."""
    return bool(GENERATED_NAME.match(name))


def _parameter_slots(op_type: str) -> tuple[int, ...]:
    """Input slots whose initializer keeps its name: a layer's weights and BatchNorm statistics.

    MatMul is left out: passes feed it constant matrices (gradient filtering's pooling sums), and
    the zoo's layers (Conv, Gemm, BatchNormalization) cover what users name.
    """
    if op_type == "MatMul":
        return ()
    slots = PARAMETER_INPUTS.get(op_type, ())
    return (*slots, *BN_STATISTICS_INPUTS) if op_type == "BatchNormalization" else slots


def _attribute_json(attribute: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attribute)
    if isinstance(value, (bytes, onnx.TensorProto, onnx.GraphProto)):
        return _attribute_item(value)
    if isinstance(value, list):
        return [_attribute_item(item) for item in value]
    return value  # ints and floats as they are: a float attribute is a float32, exact in JSON


def _attribute_item(item: Any) -> Any:
    if isinstance(item, bytes):
        return item.decode(errors="replace")
    if isinstance(item, onnx.TensorProto):
        return {"tensor": tensor_summary(numpy_helper.to_array(item))}
    if isinstance(item, onnx.GraphProto):
        canonical, _ = canonical_graph(item)
        return {"graph": hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:HASH_CHARS]}
    return item


def canonical_graph(graph: onnx.GraphProto, types: dict[str, str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The canonical form of one graph (see the module docstring) and its initializer values."""
    types = types or {}
    nodes = list(graph.node)
    order = canonical_order(graph)
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = [value.name for value in graph.input]
    stable = {name for name in [*graph_inputs, *(v.name for v in graph.output)] if not _generated(name)}
    for node in nodes:
        for slot in _parameter_slots(node.op_type):
            name = node.input[slot] if slot < len(node.input) else ""
            if name in initializers:
                stable.add(name)

    names: dict[str, str] = {name: name for name in stable}
    for position, index in enumerate(order):
        for j, output in enumerate(nodes[index].output):
            if output and output not in names:
                names[output] = f"%n{position}" if j == 0 else f"%n{position}.{j}"
    for position, index in enumerate(order):
        for slot, name in enumerate(nodes[index].input):
            if name in initializers and name not in names:
                names[name] = f"%c{position}.{slot}"

    arrays: dict[str, np.ndarray] = {}
    canonical_inits: dict[str, dict] = {}
    for name, init in initializers.items():
        array = numpy_helper.to_array(init)
        summary = tensor_summary(array)
        key = names.get(name) or f"unused.{summary['sha256']}"
        canonical_inits[key] = summary
        arrays[key] = array

    canonical_nodes = []
    for position, index in enumerate(order):
        node = nodes[index]
        record: dict[str, Any] = {"id": f"n{position}", "op": node.op_type}
        if node.domain not in ("", "ai.onnx"):
            record["domain"] = node.domain
        record["inputs"] = [names.get(name, name) if name else "" for name in node.input]
        record["outputs"] = [names.get(name, name) if name else "" for name in node.output]
        attributes = {attr.name: _attribute_json(attr) for attr in sorted(node.attribute, key=lambda a: a.name)}
        if attributes:
            record["attrs"] = attributes
        record["in_types"] = [types.get(name, "?") if name else "" for name in node.input]
        record["out_types"] = [types.get(name, "?") if name else "" for name in node.output]
        record["name"] = node.name  # informational: shown in reports, never compared
        canonical_nodes.append(record)

    data = {
        "inputs": [
            {"name": names.get(v.name, v.name), "type": _type_string(v.type)}
            for v in graph.input
            if v.name not in initializers
        ],
        "outputs": [{"name": names.get(v.name, v.name), "type": _type_string(v.type)} for v in graph.output],
        "op_counts": dict(sorted(Counter(_op_label(node) for node in canonical_nodes).items())),
        "initializers": dict(sorted(canonical_inits.items(), key=lambda item: _natural(item[0]))),
        "nodes": canonical_nodes,
    }
    return data, arrays


def _op_label(record: dict) -> str:
    return f"{record['domain']}::{record['op']}" if record.get("domain") else record["op"]


def canonical_model(model: onnx.ModelProto) -> tuple[dict, dict[str, np.ndarray]]:
    graph, arrays = canonical_graph(model.graph, _tensor_types(model))
    opsets = {(entry.domain or "ai.onnx"): entry.version for entry in model.opset_import}
    return {"ir_version": model.ir_version, "opsets": dict(sorted(opsets.items())), **graph}, arrays


def canonical_manifest(manifest: dict) -> dict:
    """The manifest minus what only says where and when the artifacts were written."""
    flat = _flatten(manifest)
    return {key: value for key, value in flat.items() if not _is_volatile(key)}


def _is_volatile(key: str) -> bool:
    return any(key == v or key.startswith(v + ".") or key.startswith(v + "[") for v in VOLATILE_MANIFEST_KEYS)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of dicts -> {"config.patch_size": 2, "plan.filtered['/conv']": 2, ...}."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            part = (
                f"{prefix}[{key!r}]"
                if ("." in key or "/" in key or " " in key)
                else (f"{prefix}.{key}" if prefix else key)
            )
            flat.update(_flatten(item, part))
        return flat
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


def checkpoint_parameters(checkpoint: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parameter values stored in an ORT checkpoint (the weights the training starts from)."""
    from runtime.ort_training import training_api

    try:
        state = training_api().CheckpointState.load_checkpoint(str(checkpoint))
    except Exception as exc:
        raise GfError(f"{checkpoint}: cannot read the checkpoint ({str(exc).strip().splitlines()[-1]})") from None
    summaries: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, parameter in sorted(state.parameters, key=lambda item: item[0]):
        array = np.asarray(parameter.data)
        summaries[name] = {**tensor_summary(array), "trainable": bool(parameter.requires_grad)}
        arrays[name] = array
    return summaries, arrays


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise GfError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def snapshot(path: Path) -> Snapshot:
    """Canonical form of an .onnx file, an artifacts folder, or a snapshot .json written by `write_snapshot`."""
    path = Path(path)
    if not path.exists():
        raise GfError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            return _artifacts_snapshot(path)
        except RecursionError:  # a manifest nested deeper than Python's stack: hostile, not a traceback
            raise GfError(f"{path}: manifest.json is nested too deeply to read") from None
    if path.stat().st_size == 0:
        raise GfError(f"{path}: file is empty")
    if path.suffix == ".json":
        return read_snapshot(path)
    model = load_onnx(path)
    if not model.graph.node:
        raise GfError(f"{path}: not an ONNX model (the graph has no nodes)")
    data, arrays = canonical_model(model)
    return Snapshot(
        str(path), {"format": SNAPSHOT_FORMAT, "kind": "model", "models": {"model": data}}, _prefixed("model", arrays)
    )


def read_manifest(directory: Path) -> Manifest:
    """The checked manifest of an artifacts folder, or a one-line error saying why it is not one."""
    if not (directory / MANIFEST).is_file():
        raise GfError(f"{directory}: no {MANIFEST}; expected an artifacts folder written by gfcompile")
    try:
        return runtime_manifest.read_manifest(directory)
    except RunError as exc:
        raise GfError(str(exc)) from None


def _artifacts_snapshot(directory: Path) -> Snapshot:
    manifest = read_manifest(directory)
    models: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in MODEL_FILES:
        file = directory / f"{name}.onnx"
        if not file.is_file():
            hint = (
                " (an ORT-format bundle: diff the artifacts it was made from)"
                if (directory / f"{name}.ort").exists()
                else ""
            )
            raise GfError(f"{directory}: {file.name} is missing{hint}")
        models[name], model_arrays = canonical_model(load_onnx(file))
        arrays.update(_prefixed(name, model_arrays))
    data: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "kind": "artifacts",
        "manifest": canonical_manifest(manifest.to_json()),
        "models": models,
    }
    checkpoint = directory / "checkpoint"
    if checkpoint.exists():
        data["parameters"], parameter_arrays = checkpoint_parameters(checkpoint)
        arrays.update(_prefixed("parameters", parameter_arrays))
    return Snapshot(str(directory), data, arrays)


def _prefixed(section: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{section}/{name}": value for name, value in arrays.items()}


# --------------------------------------------------------------------------------------------------
# Snapshot files: JSON with one node / initializer / manifest entry per line, so git diffs read well.


def write_snapshot(snap: Snapshot | dict, path: Path) -> None:
    """Write the snapshot beside `path` and rename it into place: a full disk leaves no half file."""
    data = snap.data if isinstance(snap, Snapshot) else snap
    path = Path(path)
    if path.is_dir():
        raise GfError(f"{path}: is a directory; give --snapshot a file name")
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(dumps_snapshot(data))
        os.replace(temporary, path)
    except OSError as exc:
        raise GfError(f"{path}: cannot write the snapshot ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            temporary.unlink(missing_ok=True)


def dumps_snapshot(data: dict) -> str:
    def one_line(value: Any) -> bool:
        # A node, a tensor summary or a short value stays on one line; longer containers get a line per item.
        text = json.dumps(value, separators=(",", ":"))
        return len(text) <= 100 or (isinstance(value, dict) and ("op" in value or "sha256" in value))

    def dump(value: Any, indent: int) -> str:
        if not isinstance(value, (dict, list)) or not value or one_line(value):
            return json.dumps(value, separators=(",", ":"))
        pad, inner = " " * indent, " " * (indent + 1)
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        items = [f"{inner}{dump(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"

    return dump(data, 0) + "\n"


def read_snapshot(path: Path) -> Snapshot:
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise GfError(f"{path}: not a readable snapshot ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, huge numbers, nesting deeper than Python's stack
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise GfError(f"{path}: not a readable snapshot ({problem})") from None
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise GfError(f"{path}: not a gfcompile snapshot (expected format {SNAPSHOT_FORMAT!r})")
    depth = nesting_depth(data)
    if depth > MAX_SNAPSHOT_NESTING:
        raise GfError(
            f"{path}: not a gfcompile snapshot (nested too deeply: {depth} levels, at most {MAX_SNAPSHOT_NESTING})"
        )
    problem = _snapshot_problem(data)
    if problem:
        raise GfError(f"{path}: not a gfcompile snapshot ({problem})")
    return Snapshot(str(path), data)


def _snapshot_problem(data: dict) -> str | None:
    """What is wrong with the outline of a snapshot (what compare() reads), or None."""
    if data.get("kind") not in ("model", "artifacts"):
        return f"kind must be 'model' or 'artifacts', got {data.get('kind')!r}"
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return "models must be a non-empty object"
    for name, model in models.items():
        if not isinstance(model, dict):
            return f"models.{name} must be an object"
        nodes = model.get("nodes")
        if not isinstance(nodes, list) or not all(_is_node_record(node) for node in nodes):
            return f"models.{name}.nodes must be a list of node records"
        for key in ("inputs", "outputs"):
            values = model.get(key)
            if not isinstance(values, list) or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("type"), str)
                for v in values
            ):
                return f"models.{name}.{key} must be a list of {{name, type}} records"
        counts = model.get("op_counts")
        if not isinstance(counts, dict) or not all(type(c) is int for c in counts.values()):
            return f"models.{name}.op_counts must be an object of counts"
        if not isinstance(model.get("initializers"), dict) or not all(
            isinstance(summary, dict) for summary in model["initializers"].values()
        ):
            return f"models.{name}.initializers must be an object of tensor summaries"
    for key in ("manifest", "parameters"):
        if key in data and not isinstance(data[key], dict):
            return f"{key} must be an object"
    if not all(isinstance(summary, dict) for summary in data.get("parameters", {}).values()):
        return "parameters must be an object of tensor summaries"
    return None


def _is_node_record(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and isinstance(node.get("op"), str)
        and all(
            isinstance(node.get(key), list) and all(isinstance(name, str) for name in node[key])
            for key in ("inputs", "outputs")
        )
    )


# --------------------------------------------------------------------------------------------------
# Comparing


def compare(a: Snapshot, b: Snapshot, atol: float = 0.0, ignore: Iterable[str] = ()) -> DiffReport:
    """Every difference between two canonical forms; `ignore` lists manifest keys (or key prefixes) to skip."""
    if atol < 0:
        raise GfError(f"--atol must be >= 0, got {atol}")
    if a.kind != b.kind:
        raise GfError(
            f"cannot compare {a.source} ({a.kind}) with {b.source} ({b.kind}): give two models or two folders"
        )
    differences: list[Difference] = []
    sections: list[str] = []
    if a.kind == "artifacts":
        sections.append("manifest")
        try:
            differences += _compare_manifest(a.data.get("manifest", {}), b.data.get("manifest", {}), tuple(ignore))
        except RecursionError:  # loadable, but too deep to walk: refused like an unreadable one
            raise GfError(f"{a.source}, {b.source}: a manifest is nested too deeply to compare") from None
    for name in a.data["models"]:
        sections.append(name)
        differences += _compare_model(name, a, b, atol)
    if a.kind == "artifacts" and ("parameters" in a.data or "parameters" in b.data):
        sections.append("parameters")
        differences += _compare_tensors(
            "parameters", "parameter", a.data.get("parameters", {}), b.data.get("parameters", {}), a, b, atol
        )
    return DiffReport(a=a.source, b=b.source, atol=atol, sections=sections, differences=differences)


def _compare_manifest(a: dict, b: dict, ignore: tuple[str, ...]) -> list[Difference]:
    differences = []
    for key in sorted(set(a) | set(b)):
        if any(key == skip or key.startswith(skip + ".") or key.startswith(skip + "[") for skip in ignore):
            continue
        if key not in b:
            differences.append(Difference("manifest", "manifest", key, f"only in A: {_short(a[key])}"))
        elif key not in a:
            differences.append(Difference("manifest", "manifest", key, f"only in B: {_short(b[key])}"))
        elif a[key] != b[key]:
            differences.append(Difference("manifest", "manifest", key, _value_change(a[key], b[key])))
    return differences


def _value_change(a: Any, b: Any) -> str:
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(v, (str, int, float)) for v in [*a, *b]):
        added = [v for v in b if v not in a]
        removed = [v for v in a if v not in b]
        if added or removed:
            parts = [f"{len(a)} -> {len(b)} items"]
            if removed:
                parts.append(f"removed {_short(removed)}")
            if added:
                parts.append(f"added {_short(added)}")
            return "; ".join(parts)
    return f"{_short(a)} -> {_short(b)}"


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compare_model(section: str, a: Snapshot, b: Snapshot, atol: float) -> list[Difference]:
    ma, mb = a.data["models"].get(section), b.data["models"].get(section)
    if ma is None or mb is None:
        return [Difference(section, "model", section, "only in A" if mb is None else "only in B")]
    differences = []
    for key in ("ir_version", "opsets"):
        if ma.get(key) != mb.get(key):
            differences.append(Difference(section, "model", key, _value_change(ma.get(key), mb.get(key))))
    # Nodes are aligned first; A's positional names (%n<k>, %c<k>.<slot>) are then read as the B
    # node they were paired with, so one inserted node does not make everything after it differ.
    pairs, removed, added = _align(ma["nodes"], mb["nodes"])
    translate = _translator({f"n{i}": f"n{j}" for i, j in pairs})
    for kind in ("inputs", "outputs"):
        differences += _compare_values(section, kind, ma[kind], mb[kind], translate)
    counts_a, counts_b = ma["op_counts"], mb["op_counts"]
    for op in sorted(set(counts_a) | set(counts_b)):
        if counts_a.get(op, 0) != counts_b.get(op, 0):
            differences.append(Difference(section, "op_count", op, f"{counts_a.get(op, 0)} -> {counts_b.get(op, 0)}"))
    differences += _compare_nodes(section, ma["nodes"], mb["nodes"], pairs, removed, added, translate)
    # Constants: A's keyed by their translated name (unpaired readers keep theirs and show as removed).
    inits_a: dict[str, dict] = {}
    a_arrays: dict[str, np.ndarray] = {}
    for name, summary in ma["initializers"].items():
        key = translate(name)
        key = name if key == "?" else key
        inits_a[key] = summary
        if f"{section}/{name}" in a.arrays:
            a_arrays[f"{section}/{key}"] = a.arrays[f"{section}/{name}"]
    labels = _constant_labels(mb["nodes"])
    differences += _compare_tensors(
        section,
        "initializer",
        inits_a,
        mb["initializers"],
        Snapshot(a.source, a.data, a_arrays),
        b,
        atol,
        array_prefix=section,
        labels=labels,
    )
    return differences


def _translator(a_to_b: dict[str, str]):
    def translate(name: str) -> str:
        # "%n12.1" / "%c12.1" of A -> the same output / input slot of the B node paired with n12; "?" if none.
        if not name or not _is_positional(name):
            return name
        head, dot, tail = name[1:].partition(".")
        node = f"n{head[1:]}"
        if node not in a_to_b:
            return "?"
        return f"%{head[0]}{a_to_b[node][1:]}{dot}{tail}"

    return translate


def _constant_labels(nodes: list[dict]) -> dict[str, str]:
    """ "%c12.1" -> "input 1 of Reshape [name]": where a positional constant is read."""
    labels = {}
    for node in nodes:
        for slot, name in enumerate(node["inputs"]):
            if name.startswith("%c") and name not in labels:
                labels[name] = f"input {slot} of {_op_label(node)} {_node_name(node)}".rstrip()
    return labels


def _compare_values(section: str, kind: str, a: list[dict], b: list[dict], translate) -> list[Difference]:
    singular = kind[:-1]
    differences = []
    a = [{**v, "name": translate(v["name"])} for v in a]
    types_a = {v["name"]: v["type"] for v in a}
    types_b = {v["name"]: v["type"] for v in b}
    for name in [v["name"] for v in a if v["name"] not in types_b]:
        differences.append(Difference(section, singular, name, f"removed {singular} {types_a[name]}"))
    for name in [v["name"] for v in b if v["name"] not in types_a]:
        differences.append(Difference(section, singular, name, f"added {singular} {types_b[name]}"))
    for name in [v["name"] for v in a if v["name"] in types_b]:
        if types_a[name] != types_b[name]:
            differences.append(Difference(section, singular, name, f"{types_a[name]} -> {types_b[name]}"))
    common_a = [v["name"] for v in a if v["name"] in types_b]
    common_b = [v["name"] for v in b if v["name"] in types_a]
    if common_a != common_b:
        differences.append(Difference(section, singular, "order", f"{kind} are in a different order"))
    return differences


def _compare_tensors(
    section: str,
    kind: str,
    a: dict[str, dict],
    b: dict[str, dict],
    snap_a: Snapshot,
    snap_b: Snapshot,
    atol: float,
    array_prefix: str | None = None,
    labels: dict[str, str] | None = None,
) -> list[Difference]:
    prefix = array_prefix or section
    labels = labels or {}
    differences = []
    for name in sorted(set(a) | set(b), key=_natural):
        where = f" ({labels[name]})" if name in labels else ""
        if name not in b:
            differences.append(Difference(section, kind, name, f"removed {_tensor_label(a[name])}"))
            continue
        if name not in a:
            differences.append(Difference(section, kind, name, f"added {_tensor_label(b[name])}{where}"))
            continue
        ta, tb = a[name], b[name]
        if (ta["dtype"], ta["shape"]) != (tb["dtype"], tb["shape"]):
            differences.append(Difference(section, kind, name, f"{_tensor_label(ta)} -> {_tensor_label(tb)}{where}"))
        elif ta.get("trainable") != tb.get("trainable"):
            differences.append(
                Difference(section, kind, name, f"trainable {ta.get('trainable')} -> {tb.get('trainable')}")
            )
        elif ta["sha256"] != tb["sha256"]:
            values_a = snap_a.arrays.get(f"{prefix}/{name}")
            values_b = snap_b.arrays.get(f"{prefix}/{name}")
            detail = _value_difference(ta, tb, values_a, values_b, atol)
            if detail:
                differences.append(Difference(section, kind, name, detail + where))
    return differences


def _natural(name: str) -> tuple:
    # "%c9.1" before "%c10.1": numbers compare as numbers.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _tensor_label(summary: dict) -> str:
    return f"{summary['dtype']}[{','.join(str(d) for d in summary['shape'])}]"


def _value_difference(ta: dict, tb: dict, a: np.ndarray | None, b: np.ndarray | None, atol: float) -> str | None:
    """None when the values agree within `atol`; otherwise what differs."""
    label = _tensor_label(ta)
    if a is not None and b is not None:
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
            return f"{label} values differ"
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = float(np.nanmax(delta)) if delta.size else 0.0
        nan_mismatch = bool(np.any(np.isnan(a.astype(np.float64)) != np.isnan(b.astype(np.float64))))
        if worst <= atol and not nan_mismatch:
            return None
        changed = int(np.count_nonzero(delta > atol))
        return f"{label} values differ: max |A-B| = {worst:.3g} > atol {atol:g} ({changed} of {a.size} elements)"
    # A snapshot has no values: compare what it kept (small tensors' values, or statistics) within atol.
    kept_a = ta.get("values", ta.get("stats"))
    kept_b = tb.get("values", tb.get("stats"))
    if kept_a is not None and kept_b is not None and len(kept_a) == len(kept_b):
        worst = max((abs(x - y) for x, y in zip(kept_a, kept_b, strict=True)), default=0.0)
        if worst <= atol:
            return None
        what = "values" if "values" in ta else "statistics (mean, std, min, max)"
        return f"{label} {what} differ: {_short(kept_a, 80)} -> {_short(kept_b, 80)}"
    return f"{label} values differ (sha256 {ta['sha256']} -> {tb['sha256']})"


# Nodes ---------------------------------------------------------------------------------------------


def _alignment_key(node: dict) -> tuple:
    # Op plus the stable (user-visible) names it reads: pins parameterized layers, and survives a
    # shift of every n<k> after an inserted or removed node.
    stable = tuple(name for name in node["inputs"] if name and not _is_positional(name))
    return (node.get("domain", ""), node["op"], stable)


def _is_positional(name: str) -> bool:
    return name.startswith("%")


def _align(a: list[dict], b: list[dict]) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(pairs of node indices, indices only in A, indices only in B), like a line diff."""
    pairs: list[tuple[int, int]] = []
    removed: list[int] = []
    added: list[int] = []
    keys_a = [_alignment_key(n) for n in a]
    keys_b = [_alignment_key(n) for n in b]
    matcher = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs += list(zip(range(i1, i2), range(j1, j2), strict=True))
            continue
        # Inside a changed region, pair nodes of the same op (a changed attribute or shape), then
        # what is left position by position when both sides have as many (a changed op).
        ops_a = [_op_label(n) for n in a[i1:i2]]
        ops_b = [_op_label(n) for n in b[j1:j2]]
        inner = difflib.SequenceMatcher(None, ops_a, ops_b, autojunk=False)
        for itag, k1, k2, l1, l2 in inner.get_opcodes():
            if itag == "equal" or (itag == "replace" and k2 - k1 == l2 - l1):
                pairs += [(i1 + k, j1 + l) for k, l in zip(range(k1, k2), range(l1, l2), strict=True)]
            else:
                removed += [i1 + k for k in range(k1, k2)]
                added += [j1 + l for l in range(l1, l2)]
    return pairs, removed, added


def _compare_nodes(
    section: str,
    a: list[dict],
    b: list[dict],
    pairs: list[tuple[int, int]],
    removed: list[int],
    added: list[int],
    translate,
) -> list[Difference]:
    differences = []
    for i in removed:
        differences.append(Difference(section, "node_removed", a[i]["id"], _node_line(a[i])))
    for j in added:
        differences.append(Difference(section, "node_added", b[j]["id"], _node_line(b[j])))
    for i, j in pairs:
        na, nb = a[i], b[j]
        changes = []
        if _op_label(na) != _op_label(nb):
            changes.append(f"op {_op_label(na)} -> {_op_label(nb)}")
        attrs_a, attrs_b = na.get("attrs", {}), nb.get("attrs", {})
        for key in sorted(set(attrs_a) | set(attrs_b)):
            if attrs_a.get(key) != attrs_b.get(key):
                changes.append(f"{key} {_short(attrs_a.get(key), 60)} -> {_short(attrs_b.get(key), 60)}")
        if na["in_types"] != nb["in_types"]:
            changes.append(f"input types {_types(na['in_types'])} -> {_types(nb['in_types'])}")
        if na["out_types"] != nb["out_types"]:
            changes.append(f"output types {_types(na['out_types'])} -> {_types(nb['out_types'])}")
        if [translate(x) for x in na["inputs"]] != nb["inputs"]:
            changes.append(f"inputs {_names(na['inputs'])} -> {_names(nb['inputs'])}")
        if [translate(x) for x in na["outputs"]] != nb["outputs"]:
            changes.append(f"outputs {_names(na['outputs'])} -> {_names(nb['outputs'])}")
        if changes:
            label = f"{na['id']}/{nb['id']}" if na["id"] != nb["id"] else na["id"]
            detail = f"{_op_label(nb)} {_node_name(nb)}: " + "; ".join(changes)
            differences.append(Difference(section, "node_changed", label, detail))
    return differences


def _types(types: list[str]) -> str:
    return "(" + ", ".join(t or "-" for t in types) + ")"


def _names(names: list[str]) -> str:
    return "(" + ", ".join(n or "-" for n in names) + ")"


def _node_name(node: dict) -> str:
    return f"[{node['name']}]" if node.get("name") else ""


def _node_line(node: dict) -> str:
    return f"{_op_label(node)} {_node_name(node)} {_types(node['in_types'])} -> {_types(node['out_types'])}".replace(
        "  ", " "
    )


# --------------------------------------------------------------------------------------------------
# Reporting


KIND_TITLES = {
    "manifest": "entries",
    "model": "model",
    "input": "graph inputs",
    "output": "graph outputs",
    "op_count": "op-type counts",
    "node_removed": "nodes removed (-)",
    "node_added": "nodes added (+)",
    "node_changed": "nodes changed (~)",
    "initializer": "initializers",
    "parameter": "checkpoint tensors",
}


def format_text(report: DiffReport, limit: int = 20) -> str:
    """A readable report: per section and kind, at most `limit` lines each (0: all)."""
    lines = [f"--- A: {report.a}", f"+++ B: {report.b}"]
    if report.equal:
        lines.append(f"equal: {', '.join(report.sections)} match in canonical form (atol {report.atol:g})")
        return "\n".join(lines)
    summary = []
    for section in report.sections:
        found = [d for d in report.differences if d.section == section]
        if not found:
            continue
        counts = Counter(d.kind for d in found)
        parts = ", ".join(f"{count} {KIND_TITLES[kind].split(' (')[0]}" for kind, count in counts.items())
        summary.append(f"{section} ({parts})")
        lines.append(f"{section}:")
        for kind, title in KIND_TITLES.items():
            of_kind = [d for d in found if d.kind == kind]
            if not of_kind:
                continue
            lines.append(f"  {title}:")
            shown = of_kind if limit <= 0 else of_kind[:limit]
            for d in shown:
                lines.append(f"    {_marker(kind)} {d.item}: {d.detail}")
            if len(shown) < len(of_kind):
                lines.append(f"    ... {len(of_kind) - len(shown)} more (--limit 0 or --format json shows all)")
    lines.append("differ: " + "; ".join(summary))
    return "\n".join(lines)


def _marker(kind: str) -> str:
    return {"node_removed": "-", "node_added": "+"}.get(kind, "~")


def diff_paths(a: Path, b: Path, atol: float = 0.0, ignore: Iterable[str] = ()) -> DiffReport:
    return compare(snapshot(a), snapshot(b), atol=atol, ignore=ignore)
