"""Running an ordered list of passes: the only place that converts ModelProto <-> gs.Graph.

Around every pass the runner enforces the contract of `passes.base`: the pass belongs to
the stage being run, the passes it REQUIRES already ran in this compile (`Plan.passes_run`,
or `history` in the legalize stage, which has no Plan), its FACTS hold, and afterwards every
tensor name has exactly one producer. Whatever escapes a pass comes out as a one-line
GfError naming the pass.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

import onnx
import onnx_graphsurgeon as gs

from passes.base import GRAPH_FACTS, STAGES, Plan

from .errors import GfError

_LOG = logging.getLogger("gfcompile.passes")


def pass_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def passes_before(passes: Sequence[ModuleType], stop: ModuleType) -> tuple[ModuleType, ...]:
    """The passes of `passes` that run before `stop` (which must be one of them)."""
    if stop not in passes:
        raise ValueError(f"pass {pass_name(stop)} is not in {[pass_name(p) for p in passes]}")
    return tuple(passes[: list(passes).index(stop)])


def run_passes(
    passes: Sequence[ModuleType],
    model: onnx.ModelProto,
    plan: Plan | None,
    stage: str,
    history: list[str] | None = None,
) -> onnx.ModelProto:
    """Run `passes` in order on `model`; returns the rewritten model.

    `history` lists the passes already run in this compile and is extended; it defaults to
    `plan.passes_run` (a Plan lives for one compile). Only the legalize stage runs without a Plan.
    """
    if stage not in STAGES:
        raise GfError(f"internal error: unknown pass stage {stage!r}")
    if history is None:
        history = plan.passes_run if plan is not None else []
    for module in passes:
        name = pass_name(module)
        check_declarations(module, stage)
        missing = [required for required in module.REQUIRES if required not in history]
        if missing:
            raise GfError(f"internal error: pass {name} requires {', '.join(missing)} to run before it")
        _check_facts(module, model)
        _LOG.debug("running %s (%s stage, %d nodes)", name, stage, len(model.graph.node))
        with _recursion_for(model):
            graph = gs.import_onnx(model)
            positions = {id(node): index for index, node in enumerate(graph.nodes)}
            graph = _run_one(module, graph, plan)
            # Before cleanup: onnx-graphsurgeon's cleanup silently drops one of two tensors that share a name.
            problem = shared_name_problem(graph)
            if problem:
                raise GfError(f"internal error in pass {name}: {problem}")
            try:
                if stage == "legalize":
                    _stable_toposort(graph.cleanup(), positions)
                else:
                    # Later stages keep onnx-graphsurgeon's sort for now: row_recompute's per-band
                    # backward order in ORT depends on it (test_recompute_runs_band_by_band_in_the_backward).
                    graph.cleanup().toposort()
                model = _export_like(graph, model)
            except Exception as exc:  # the pass left a graph onnx-graphsurgeon cannot sort or export
                raise GfError(f"internal error in pass {name}: {_one_line(exc)}") from exc
        problem = single_producer_problem(model)
        if problem:
            raise GfError(f"internal error in pass {name}: {problem}")
        history.append(name)
    return model


def _stable_toposort(graph: gs.Graph, positions: dict[int, int]) -> None:
    """Sort `graph` topologically while keeping the nodes a pass did not add in their order.

    The order of a model's nodes means something to the compiler: the planner's "last N convs" is
    graph order, so the legalize passes before it must not reshuffle the rest, as
    onnx-graphsurgeon's own toposort may (it moved ResNet's downsample conv). Each node the pass added goes just
    before its earliest reader; among nodes that are ready, the one with the smallest key runs first,
    which reproduces the original order exactly wherever that order was already valid.
    """
    graph.toposort()  # a valid order (and onnx-graphsurgeon's check for cycles) to derive keys from
    order = list(graph.nodes)
    keys: dict[int, tuple[float, int]] = {}
    for index in range(len(order) - 1, -1, -1):
        node = order[index]
        if id(node) in positions:
            keys[id(node)] = (float(positions[id(node)]), index)
            continue
        readers = [keys[id(reader)][0] for out in node.outputs for reader in out.outputs if id(reader) in keys]
        keys[id(node)] = (min(readers, default=float(len(positions) + index)), index)
    produced_by = {id(tensor): node for node in order for tensor in node.outputs}
    waiting = {
        id(node): len({id(t) for t in node.inputs if id(t) in produced_by and produced_by[id(t)] is not node})
        for node in order
    }
    ready = [(keys[id(node)], id(node), node) for node in order if waiting[id(node)] == 0]
    heapq.heapify(ready)
    sorted_nodes: list[gs.Node] = []
    while ready:
        _, _, node = heapq.heappop(ready)
        sorted_nodes.append(node)
        for reader in {id(r): r for out in node.outputs for r in out.outputs}.values():
            if id(reader) not in waiting:
                continue  # a reader inside a subgraph: its own graph sorts it
            pending = {id(t) for t in reader.inputs if id(t) in produced_by and produced_by[id(t)] is node}
            waiting[id(reader)] -= len(pending)
            if pending and waiting[id(reader)] == 0:
                heapq.heappush(ready, (keys[id(reader)], id(reader), reader))
    if len(sorted_nodes) == len(order):
        graph.nodes = sorted_nodes


def check_declarations(module: ModuleType, stage: str) -> None:
    """The module declares the pass contract (STAGE, REQUIRES, run; FACTS if any) and belongs to `stage`."""
    name = pass_name(module)
    for attribute in ("STAGE", "REQUIRES", "run"):
        if not hasattr(module, attribute):
            raise GfError(f"internal error: pass {name} does not declare {attribute}")
    if stage != module.STAGE:
        raise GfError(f"internal error: pass {name} is a {module.STAGE} pass, run in the {stage} stage")
    unknown = [fact for fact in getattr(module, "FACTS", ()) if fact not in GRAPH_FACTS]
    if unknown:
        raise GfError(f"internal error: pass {name} declares unknown facts {unknown}")


def _run_one(module: ModuleType, graph: gs.Graph, plan: Plan | None) -> gs.Graph:
    name = pass_name(module)
    try:
        result = module.run(graph, plan)
    except (ValueError, GfError) as exc:  # passes refuse what they cannot rewrite with ValueError
        raise GfError(f"{name}: {exc}") from None
    except Exception as exc:
        _LOG.debug("pass %s failed", name, exc_info=True)
        raise GfError(f"internal error in pass {name}: {_one_line(exc)}") from exc
    if not isinstance(result, gs.Graph):
        raise GfError(f"internal error in pass {name}: run() returned {type(result).__name__}, not a graph")
    return result


def shared_name_problem(graph: gs.Graph) -> str | None:
    """Why two different tensor objects of `graph` share a name (None if none do)."""
    seen: dict[str, gs.Tensor] = {}
    tensors = [*graph.inputs, *graph.outputs]
    for node in graph.nodes:
        tensors.extend(t for t in (*node.inputs, *node.outputs) if t is not None)
    for tensor in tensors:
        if not tensor.name:
            continue
        first = seen.setdefault(tensor.name, tensor)
        if first is not tensor:
            return f"two different tensors are named {tensor.name!r}"
    return None


def _one_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def single_producer_problem(model: onnx.ModelProto) -> str | None:
    """Why the graph's tensor names are not each written exactly once (None if they are).

    Graph inputs and initializers count as producers (an initializer that is also an input
    gives the input's default: one tensor). Every tensor a node or the graph output reads
    must have a producer. Subgraphs (If/Loop bodies) are not looked into.
    """
    graph = model.graph
    producers: collections.Counter[str] = collections.Counter()
    inputs = [value.name for value in graph.input]
    initializers = [init.name for init in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    producers.update(inputs)
    producers.update(initializers)
    for name in set(inputs) & set(initializers):
        producers[name] -= 1  # an initializer that is also an input is that input's default
    for node in graph.node:
        producers.update(name for name in node.output if name)
    duplicated = sorted(name for name, count in producers.items() if count > 1)
    if duplicated:
        more = f" (and {len(duplicated) - 1} more)" if len(duplicated) > 1 else ""
        return f"tensor {duplicated[0]!r} is written {producers[duplicated[0]]} times{more}"
    for node in graph.node:
        for name in node.input:
            if name and name not in producers:
                return f"node {node.name!r} reads {name!r}, which nothing produces"
    for value in graph.output:
        if value.name not in producers:
            return f"graph output {value.name!r} is not produced"
    return None


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


def _check_facts(module: ModuleType, model: onnx.ModelProto) -> None:
    name = pass_name(module)
    for fact in getattr(module, "FACTS", ()):
        if fact == "static_shapes":
            for value in model.graph.input:
                dims = value.type.tensor_type.shape.dim
                if any(not d.HasField("dim_value") for d in dims):
                    raise GfError(f"internal error: pass {name} needs static shapes; {value.name} is dynamic")
        elif fact == "ort_gradient_graph" and not any(
            node.domain == "com.microsoft" or node.op_type.endswith("Grad") for node in model.graph.node
        ):
            raise GfError(f"internal error: pass {name} runs on a training graph only")
