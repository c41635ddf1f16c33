"""The pass contract: names unique by construction, the runner's checks, and V1 (issue 15).

V1: a user tensor named like one the gradient filter generates ("<conv>/gf/g_pool") made the
filter's ops read the user's tensor. The compile must now be exactly the compile of the same
model without the rename.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import passes
from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.passrunner import passes_before, run_passes, single_producer_problem
from gfcompile.pipeline import FORWARD_PASSES, compile_model
from passes import bn_eval_affine, row_tiling
from passes.base import GRAPH_FACTS, STAGES, Plan
from passes.emitter import Emitter
from passes.names import NameAllocator, parse_band
from runtime.ort_training import training_api
from tests.tiny_models import tiny_cnn
from tests.zoo_helpers import relative_error

# --------------------------------------------------------------------------------------------
# NameAllocator and Emitter on a hand-built graph
# --------------------------------------------------------------------------------------------


def _relu_graph(*tensor_names: str) -> gs.Graph:
    """x -> Relu -> y, plus one Identity per extra tensor name (so those names are taken)."""
    x = gs.Variable("x", dtype=np.float32, shape=[1, 2])
    y = gs.Variable("y", dtype=np.float32, shape=[1, 2])
    nodes = [gs.Node("Relu", "relu", inputs=[x], outputs=[y])]
    for name in tensor_names:
        nodes.append(
            gs.Node("Identity", f"id_{len(nodes)}", inputs=[y], outputs=[gs.Variable(name, np.float32, [1, 2])])
        )
    outputs = [y, *(node.outputs[0] for node in nodes[1:])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17)


def test_allocator_never_hands_out_a_name_in_use() -> None:
    graph = _relu_graph("conv/gf/g_pool", "z")
    names = NameAllocator(graph)
    assert names.fresh("new") == "new"
    assert names.fresh("new") == "new~1"  # handed out once: taken
    assert names.fresh("y") == "y~1" and names.fresh("relu") == "relu~1"  # tensor and node names
    # A scope is free only if no name lies inside it: the user's "conv/gf/g_pool" takes "conv/gf".
    scope = names.scope("conv/gf")
    assert scope == "conv/gf~1"
    assert names.scope("conv/gf") == "conv/gf~2"  # and a scope handed out is not handed out again
    assert names.scope("other") == "other"
    assert names.scope("relu") == "relu"  # a node's own name may scope its rewrite: only "relu/..." is handed out
    # A name inside someone else's scope is never handed out by fresh(), even if unused.
    assert not names.fresh("other/x").startswith("other/")
    # No variant of a name inside a scope can leave it by a suffix; the first component changes.
    assert names.scope("other/nested") == "other~1/nested"
    with pytest.raises(RuntimeError, match="already used"):
        names.claim("z")


def test_emitter_names_are_new_even_where_the_user_took_the_preferred_ones() -> None:
    graph = _relu_graph("conv/gf/g_pool", "conv/gf/g_pool_rows")
    user_tensors = set(graph.tensors())
    em = Emitter(graph, NameAllocator(graph), "conv/gf")
    y = graph.tensors()["y"]
    pooled = em.op("Relu", "g_pool", [y], (1, 2))
    shaped = em.reshape("g_pool_rows", pooled, (2, 1))
    graph.outputs.append(shaped)
    assert em.scope not in ("conv/gf",) and pooled.name == f"{em.scope}/g_pool"
    assert pooled.name not in user_tensors and shaped.name not in user_tensors
    with pytest.raises(RuntimeError, match="already used"):
        em.op("Relu", "g_pool", [y], (1, 2))  # a local name twice in one scope is a bug in the pass
    model = gs.export_onnx(graph)
    assert single_producer_problem(model) is None
    onnx.checker.check_model(model)


def test_band_names_parse_back_only_under_published_scopes() -> None:
    scopes = {"pool1": "rowtile/pool1", "a/band3": "rowtile/a/band3"}
    assert parse_band("rowtile/pool1/band12/conv1", scopes).band == 12
    assert parse_band("rowtile/pool1/band2/conv1_Grad/ConvGrad_0", scopes).chain == "pool1"
    assert parse_band("rowtile/a/band3/band0/x", scopes).chain == "a/band3"  # a chain named like a band
    assert parse_band("rowtile/pool1/band/conv", scopes) is None
    assert parse_band("rowtile/pool2/band0/conv", scopes) is None  # not a tiled chain: a user's node
    assert parse_band("rowtile/pool1/band1x/conv", scopes) is None


# --------------------------------------------------------------------------------------------
# The runner's checks, with small stand-in passes
# --------------------------------------------------------------------------------------------


def _pass(name: str, run: Callable, stage: str = "forward", requires: tuple[str, ...] = ()) -> types.ModuleType:
    module = types.ModuleType(f"passes.{name}")
    module.STAGE, module.REQUIRES, module.FACTS, module.run = stage, requires, (), run
    return module


def _model() -> onnx.ModelProto:
    return gs.export_onnx(_relu_graph())


def _identity(graph: gs.Graph, plan) -> gs.Graph:
    return graph


def test_runner_refuses_a_second_producer() -> None:
    def writes_y_again(graph: gs.Graph, plan) -> gs.Graph:
        x = graph.tensors()["x"]
        again = gs.Variable("y", dtype=np.float32, shape=[1, 2])  # a new tensor with a name in use
        graph.nodes.append(gs.Node("Neg", "neg", inputs=[x], outputs=[again]))
        graph.outputs.append(again)
        return graph

    with pytest.raises(GfError, match=r"^internal error in pass dup: two different tensors are named 'y'$"):
        run_passes((_pass("dup", writes_y_again),), _model(), Plan(convs=[]), "forward")


def test_runner_refuses_a_read_of_nothing() -> None:
    def reads_a_ghost(graph: gs.Graph, plan) -> gs.Graph:
        ghost = gs.Variable("ghost", dtype=np.float32, shape=[1, 2])
        out = gs.Variable("sum", dtype=np.float32, shape=[1, 2])
        graph.nodes.append(gs.Node("Add", "add", inputs=[graph.tensors()["y"], ghost], outputs=[out]))
        graph.outputs.append(out)
        return graph

    with pytest.raises(GfError, match=r"^internal error in pass ghost: node 'add' reads 'ghost', which nothing"):
        run_passes((_pass("ghost", reads_a_ghost),), _model(), Plan(convs=[]), "forward")


def test_runner_checks_requires_across_stages_of_one_compile() -> None:
    first = _pass("first", _identity)
    second = _pass("second", _identity, stage="training", requires=("first",))
    with pytest.raises(GfError, match=r"^internal error: pass second requires first to run before it$"):
        run_passes((second,), _model(), Plan(convs=[]), "training")
    plan = Plan(convs=[])
    run_passes((first,), _model(), plan, "forward")
    run_passes((second,), _model(), plan, "training")  # `first` ran earlier in this compile (this plan)
    assert plan.passes_run == ["first", "second"]
    history: list[str] = []
    run_passes((_pass("legal", _identity, stage="legalize"),), _model(), None, "legalize", history=history)
    assert history == ["legal"]


def test_runner_names_the_pass_that_failed() -> None:
    def refuses(graph, plan):
        raise ValueError("cannot tile a 0-row chain")

    def crashes(graph, plan):
        return {}["missing"]

    def returns_nothing(graph, plan):
        return None

    plan = Plan(convs=[])
    with pytest.raises(GfError, match=r"^refuser: cannot tile a 0-row chain$"):
        run_passes((_pass("refuser", refuses),), _model(), plan, "forward")
    with pytest.raises(GfError, match=r"^internal error in pass crasher: KeyError: 'missing'$") as caught:
        run_passes((_pass("crasher", crashes),), _model(), plan, "forward")
    assert isinstance(caught.value.__cause__, KeyError)  # kept for debugging, not printed
    with pytest.raises(GfError, match=r"^internal error in pass lazy: run\(\) returned NoneType"):
        run_passes((_pass("lazy", returns_nothing),), _model(), plan, "forward")
    with pytest.raises(GfError, match=r"is a training pass, run in the forward stage"):
        run_passes((_pass("late", _identity, stage="training"),), _model(), plan, "forward")
    assert plan.passes_run == []  # none of them completed


def test_passes_before_is_explicit() -> None:
    assert passes_before(FORWARD_PASSES, row_tiling) == tuple(p for p in FORWARD_PASSES if p is not row_tiling)
    with pytest.raises(ValueError):
        passes_before((bn_eval_affine,), row_tiling)


def _pass_modules() -> list[types.ModuleType]:
    modules = [importlib.import_module(f"passes.{info.name}") for info in pkgutil.iter_modules(passes.__path__)]
    return [module for module in modules if hasattr(module, "run")]


def test_every_pass_declares_the_contract() -> None:
    pass_modules = _pass_modules()
    names = {module.__name__.rsplit(".", 1)[-1] for module in pass_modules}
    assert {"gradient_filter", "row_tiling", "row_recompute"} <= names
    for module in pass_modules:
        assert module.STAGE in STAGES, module.__name__
        assert set(module.REQUIRES) <= names, (module.__name__, module.REQUIRES)
        assert set(getattr(module, "FACTS", ())) <= set(GRAPH_FACTS), module.__name__
        assert (module.__doc__ or "").strip(), f"{module.__name__} has no docstring contract"
        # A pass never imports another pass: shared code lives in non-pass modules.
        imported = {value.__name__ for value in vars(module).values() if isinstance(value, types.ModuleType)}
        assert not imported & {f"passes.{name}" for name in names}, module.__name__


# --------------------------------------------------------------------------------------------
# V1: user tensors named like generated ones
# --------------------------------------------------------------------------------------------


def _rename(model: onnx.ModelProto, renames: dict[str, str], node_renames: dict[str, str]) -> onnx.ModelProto:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.name = node_renames.get(node.name, node.name)
    onnx.checker.check_model(renamed, full_check=True)
    return renamed


def _batch(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal((4, 3, size, size)).astype(np.float32), np.array([0, 3, 1, 4], dtype=np.int64)


def _gradients(directory: Path, parameters: list[str], size: int = 16) -> dict[str, np.ndarray]:
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    module.train()
    module(*_batch(size))
    return {name: state.parameters[name].grad.copy() for name in parameters}


def test_v1_user_tensors_named_like_filter_tensors_compile_exactly(tmp_path: Path) -> None:
    model = tiny_cnn()  # conv1, conv2 (stride 2), conv3; --filter-layers 2 filters conv2 and conv3
    # Every role a later pass looks up (x~, g^, the upsample chain) and a helper node name.
    tensors = {"relu1": "conv2/gf/x_pool", "relu2": "conv3/gf/g_pool", "conv2_out": "conv3/gf/up"}
    nodes = {"relu2": "conv2/gf/g_pool_rows"}
    renamed = _rename(model, tensors, nodes)
    (tmp_path / "plain.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "renamed.onnx").write_bytes(renamed.SerializeToString())
    results = {}
    for name in ("plain", "renamed"):
        config = CompileConfig(filter_layers=2, batch_size=4, output_dir=tmp_path / f"{name}_artifacts")
        compile_model(tmp_path / f"{name}.onnx", config, report=lambda message: None)
        results[name] = config.output_dir
    training = onnx.load(str(results["renamed"] / "training_model.onnx"))
    assert single_producer_problem(training) is None
    produced = {out for node in training.graph.node for out in node.output}
    assert set(tensors.values()) <= produced  # the user's tensors are still the user's
    # ... and the filter of conv3 got a scope of its own, next to the user's names.
    assert any(node.name.startswith("conv3/gf~1/") for node in training.graph.node)

    parameters = ["conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias", "fc.weight", "fc.bias"]
    expected = _gradients(results["plain"], parameters)
    actual = _gradients(results["renamed"], parameters)
    for name in parameters:
        assert np.abs(expected[name]).max() > 0, name
        assert relative_error(actual[name], expected[name]) <= 1e-6, name


def test_user_nodes_named_like_bands_do_not_confuse_row_tiling(tmp_path: Path) -> None:
    model = tiny_cnn(input_shape=(3, 32, 32))
    (tmp_path / "plain.onnx").write_bytes(model.SerializeToString())

    def compile_artifacts(source: str, tiles: int) -> Path:
        config = CompileConfig(train_layers=1, batch_size=4, row_tiles=tiles, output_dir=tmp_path / f"{source}{tiles}")
        compile_model(tmp_path / f"{source}.onnx", config, report=lambda message: None)
        return config.output_dir

    def band_nodes(directory: Path) -> list[str]:
        return [node.name for node in onnx.load(str(directory / "eval_model.onnx")).graph.node if "/band" in node.name]

    bands = band_nodes(compile_artifacts("plain", 4))
    assert bands and all(name.startswith("rowtile/") for name in bands), "the plain model should tile"
    # The user's nodes take names the pass would have generated.
    (tmp_path / "renamed.onnx").write_bytes(
        _rename(model, {}, {"relu1": bands[0], "relu2": bands[-1]}).SerializeToString()
    )
    renamed = compile_artifacts("renamed", 4)
    assert single_producer_problem(onnx.load(str(renamed / "training_model.onnx"))) is None
    assert any("~1/band" in name for name in band_nodes(renamed))  # tiled, under a fresh scope
    parameters = ["conv3.weight", "conv3.bias", "fc.weight", "fc.bias"]
    expected = _gradients(compile_artifacts("plain", 0), parameters, size=32)
    actual = _gradients(renamed, parameters, size=32)
    for name in parameters:
        assert np.abs(expected[name]).max() > 0, name
        assert relative_error(actual[name], expected[name]) <= 1e-5, name


def test_tiling_that_tiles_nothing_changes_no_session_option(tmp_path: Path) -> None:
    # One 3x3 conv before the global pool: no chain ends at a pool or stride, nothing to tile.
    from tests.tiny_models import ConvSpec

    path = tmp_path / "flat.onnx"
    path.write_bytes(tiny_cnn([ConvSpec(4), ConvSpec(4)]).SerializeToString())
    messages: list[str] = []
    config = CompileConfig(train_layers=1, batch_size=2, row_tiles=4, output_dir=tmp_path / "artifacts")
    compile_model(path, config, report=messages.append)
    import json

    manifest = json.loads((config.output_dir / "manifest.json").read_text())
    assert manifest["plan"]["row_tiles"] == 0
    untiled = row_tiling.required_session_options(Plan(convs=[]))
    assert manifest["session_options"] == untiled
    assert any("no conv chain could be tiled" in message for message in messages)
    eval_model = onnx.load(str(config.output_dir / "eval_model.onnx"))
    assert not [node.name for node in eval_model.graph.node if "rowtile" in node.name]


def test_model_for_runner_checks_is_valid() -> None:
    # The stand-in graph itself passes the checks (so the failures above are the passes' doing).
    model = _model()
    assert single_producer_problem(model) is None
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])],
        "twice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    assert single_producer_problem(helper.make_model(graph)) == "tensor 'y' is written 2 times"


def test_verbose_compile_shows_why_row_tiling_skipped(tmp_path: Path, capsys) -> None:
    import logging

    from gfcompile.cli import main
    from tests.tiny_models import ConvSpec

    path = tmp_path / "flat.onnx"
    path.write_bytes(tiny_cnn([ConvSpec(4), ConvSpec(4)]).SerializeToString())
    args = [str(path), "-o", str(tmp_path / "artifacts"), "--train-layers", "1", "--batch-size", "2"]
    try:
        assert main([*args, "--row-tiles", "4", "-v"]) == 0
    finally:
        logging.getLogger("gfcompile.passes").handlers.clear()
    err = capsys.readouterr().err
    assert "gfcompile.passes.row_tiling: region: 2 row-local ops from x, ended by conv2 (trained;" in err
    assert "--row-tiles 4: no conv chain could be tiled" in err
    assert "running gradient_filter (training stage" in err


def test_runner_keeps_the_node_order_a_pass_did_not_need_to_change() -> None:
    """Graph order is meaningful to the planner ("last N convs"), which runs after the legalize passes:
    a legalize pass that inserts a node before an early reader moves only that node."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    outputs = [helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, [1, 2]) for i in range(4)]
    # Four independent branches in an order no sort by name or by depth would produce.
    nodes = [helper.make_node("Relu", ["x"], [f"b{i}"], name=f"branch{i}") for i in (2, 0, 3, 1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [outputs[i] for i in (2, 0, 3, 1)]))

    def negate_before_branch3(graph: gs.Graph, plan) -> gs.Graph:
        source = graph.tensors()["x"]
        negated = gs.Variable("negated", dtype=np.float32, shape=[1, 2])
        graph.nodes.append(gs.Node("Neg", "neg", inputs=[source], outputs=[negated]))
        branch3 = next(node for node in graph.nodes if node.name == "branch3")
        branch3.inputs[0] = negated
        return graph

    result = run_passes((_pass("neg", negate_before_branch3, stage="legalize"),), model, None, "legalize")
    assert [node.name for node in result.graph.node] == ["branch2", "branch0", "neg", "branch3", "branch1"]
    unchanged = run_passes((_pass("noop", _identity, stage="legalize"),), model, None, "legalize")
    assert [node.name for node in unchanged.graph.node] == ["branch2", "branch0", "branch3", "branch1"]
