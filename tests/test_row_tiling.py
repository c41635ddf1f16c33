"""Row-centric tiling of frozen conv chains (passes/row_tiling.py): geometry, exactness, order, memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from gfcompile.backward import build_backward
from gfcompile.config import CompileConfig
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.passrunner import run_passes
from gfcompile.pipeline import FORWARD_PASSES
from gfcompile.planning import select_layers
from passes import row_recompute, row_tiling
from runtime.ort_training import training_api
from tests.peak_memory import CAN_MEASURE, SKIP_REASON, forward_peak_bytes, training_step_peak_bytes
from tests.tiny_models import ConvSpec, tiny_cnn
from tests.zoo_helpers import randomize_batchnorm, relative_error, torch

nn = torch.nn


# --------------------------------------------------------------------------------------------
# Graph rewrite: exactness of the tiled forward under ORT
# --------------------------------------------------------------------------------------------


class _Head(nn.Module):
    def __init__(self, channels: int, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _vgg_style() -> nn.Module:
    from models.vgg import _CFG_D, _make_features

    # VGG-16-BN's 13-conv trunk (torchvision names) with a small trainable head.
    return nn.Sequential(_make_features(_CFG_D[:10], 3), _Head(256))


def _odd_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(12, 12, 3, padding=1, groups=3),
        nn.Sigmoid(),
        nn.MaxPool2d(3, stride=2),
        _Head(12),
    )


def _dilated_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=3, dilation=3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 16, (5, 3), padding=(4, 1), dilation=(2, 1)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        _Head(16),
    )


def _zoo(name: str, **kwargs) -> nn.Module:
    from models import build

    return build(name, **kwargs)


MODELS = {
    "vgg16_style": (_vgg_style, (3, 64, 64)),
    "resnet18": (lambda: _zoo("resnet18", num_classes=5), (3, 64, 64)),
    # At 96 rows a chain spans layer1's residual blocks and layer2's strided block.
    "resnet18_96": (lambda: _zoo("resnet18", num_classes=5), (3, 96, 96)),
    "mobilenet_v2": (lambda: _zoo("mobilenet_v2", num_classes=5, width_mult=0.35), (3, 64, 64)),
    "dilated": (_dilated_net, (3, 61, 40)),
    "odd_225": (_odd_net, (3, 225, 33)),
    "odd_97": (_odd_net, (3, 97, 51)),
}


def _export(name: str, directory: Path) -> Path:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    randomize_batchnorm(model)
    model.eval()
    from models.export import export_onnx

    return export_onnx(model, directory / f"{name}.onnx", input_shape=(1, *shape))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("row_tiling_models")
    return {name: _export(name, directory) for name in MODELS}


def _forward(
    path: Path, tiles: int, strategy: str = "overl", train_layers: int = 1, batch: int = 2, trainable: bool = False
):
    config = CompileConfig(train_layers=train_layers, batch_size=batch, row_tiles=tiles, row_strategy=strategy)
    model = pin_shapes(load_and_validate(path), config)
    plan = select_layers(model, config)
    plan.row_tile_trainable = trainable
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")  # row_tiling is the last forward pass
    return forward, plan, config


def _session(model: onnx.ModelProto, plan, profile: str | None = None) -> ort.InferenceSession:
    spec = row_tiling.required_session_options(plan)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["graph_optimization_level"])
    options.execution_order = getattr(ort.ExecutionOrder, spec["execution_order"])
    options.enable_cpu_mem_arena = spec["enable_cpu_mem_arena"]
    options.enable_mem_pattern = spec["enable_mem_pattern"]
    options.enable_mem_reuse = spec["enable_mem_reuse"]
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _input(model: onnx.ModelProto) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(3).standard_normal(dims).astype(np.float32)


def _band_nodes(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.name.startswith("rowtile/")]


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
@pytest.mark.parametrize("tiles", [2, 4, 8])
@pytest.mark.parametrize("name", list(MODELS))
def test_tiled_forward_is_exact(exported: dict[str, Path], name: str, tiles: int, strategy: str) -> None:
    base, plan, _ = _forward(exported[name], 0)
    tiled, tiled_plan, _ = _forward(exported[name], tiles, strategy)
    assert _band_nodes(tiled), "nothing was tiled"
    x = _input(base)
    expected = _session(base, plan).run(None, {base.graph.input[0].name: x})[0]
    actual = _session(tiled, tiled_plan).run(None, {tiled.graph.input[0].name: x})[0]
    assert relative_error(actual, expected) <= 1e-5
    onnx.checker.check_model(tiled)

    # Every tileable chain, not only those the pass picks, so every op kind runs banded.
    graph = gs.import_onnx(base)
    chains = row_tiling.candidate_chains(graph, plan, tiles)
    for chain in chains:
        row_tiling.tile_chain(graph, chain, tiles, strategy)
    everything = gs.export_onnx(graph.cleanup().toposort())
    actual = _session(everything, tiled_plan).run(None, {base.graph.input[0].name: x})[0]
    assert relative_error(actual, expected) <= 1e-5, [chain.name for chain in chains]


def test_chains_cover_residual_depthwise_and_strided_layers(exported: dict[str, Path]) -> None:
    forward, plan, _ = _forward(exported["resnet18"], 0)
    chains = row_tiling.candidate_chains(gs.import_onnx(forward), plan, 4)
    ops = [op.node.op for chain in chains for op in chain.ops]
    assert ops.count("Add") >= 2 and "MaxPool" in ops  # residual blocks and the stem pool
    forward, plan, _ = _forward(exported["mobilenet_v2"], 0)
    chains = row_tiling.candidate_chains(gs.import_onnx(forward), plan, 4)
    groups = [op.node.attrs.get("group", 1) for chain in chains for op in chain.ops if op.node.op == "Conv"]
    strides = [op.row.stride for chain in chains for op in chain.ops]
    assert max(groups) > 1 and 2 in strides  # depthwise and stride-2 convs inside chains
    forward, plan, _ = _forward(exported["odd_225"], 0)
    chains = row_tiling.candidate_chains(gs.import_onnx(forward), plan, 4)
    ops = {op.node.op for chain in chains for op in chain.ops}
    assert {"AveragePool", "MaxPool", "Clip", "LeakyRelu", "Sigmoid"} <= ops
    assert any(op.row.ceil_mode for chain in chains for op in chain.ops)


def test_trainable_layers_are_not_tiled(exported: dict[str, Path]) -> None:
    tiled, plan, _ = _forward(exported["resnet18"], 4, "overl", train_layers=6)
    trainable = set(plan.trainable_convs)
    names = {node.name for node in tiled.graph.node}
    assert trainable <= names  # the trainable convs are untouched originals
    initializers = {init.name for init in tiled.graph.initializer}
    assert set(plan.trainable_params) <= initializers


def test_too_many_tiles_is_a_clear_error(exported: dict[str, Path]) -> None:
    forward, plan, _ = _forward(exported["vgg16_style"], 0)
    graph = gs.import_onnx(forward)
    limit = row_tiling.max_row_tiles(graph, plan)
    assert limit == 32  # the first block ends at a 2x2 pool of the 64-row input
    plan.row_tiles = limit + 1
    with pytest.raises(ValueError, match=f"--row-tiles 33 is more than the 32 output rows.*use --row-tiles <= {limit}"):
        row_tiling.run(graph, plan)
    plan.row_tiles, plan.row_strategy = 4, "2pass"
    with pytest.raises(ValueError, match="unknown row strategy '2pass'"):
        row_tiling.run(graph, plan)
    plan.row_tiles, plan.row_strategy = -2, "overl"
    with pytest.raises(ValueError, match="integer >= 2"):
        row_tiling.run(graph, plan)
    # Through the pass runner the message is a GfError naming the pass.
    from gfcompile.errors import GfError

    plan.row_tiles = 64
    with pytest.raises(GfError, match="row_tiling: --row-tiles 64 is more than"):
        run_passes((row_tiling,), forward, plan, stage="forward")


# --------------------------------------------------------------------------------------------
# End to end: the training artifacts give the same loss and gradients
# --------------------------------------------------------------------------------------------


def _loss_and_gradients(forward: onnx.ModelProto, plan, config: CompileConfig, directory: Path, x, y):
    train = build_backward(forward, plan, config, directory)
    train.training = run_passes((row_recompute,), train.training, plan, stage="training")
    onnx.save(train.training, str(directory / "training_model.onnx"))
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
    module.train()
    loss = float(np.asarray(module(x, y)[0]))
    grads = {name: state.parameters[name].grad.copy() for name in plan.trainable_params}
    module.eval()
    eval_loss = float(np.asarray(module(x, y)[0]))
    return loss, eval_loss, grads, train


def _assert_tiled_training_matches_untiled(
    path: Path, directory: Path, tiles: int, strategy: str, train_layers: int, trainable: bool
):
    """Training artifacts with `tiles` row bands (trainable chains too if `trainable`) give the untiled
    compile's loss, eval loss and every gradient within 1e-5; returns the tiled training graph and plan."""
    base, plan, config = _forward(path, 0, train_layers=train_layers)
    tiled, tiled_plan, tiled_config = _forward(path, tiles, strategy, train_layers, trainable=trainable)
    assert _band_nodes(tiled), "nothing was tiled"
    x = _input(base)
    y = np.array([1, 3], dtype=np.int64)
    loss, eval_loss, grads, _ = _loss_and_gradients(base, plan, config, directory / "base", x, y)
    t_loss, t_eval_loss, t_grads, train = _loss_and_gradients(
        tiled, tiled_plan, tiled_config, directory / "tiled", x, y
    )
    assert abs(t_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    assert abs(t_eval_loss - eval_loss) <= 1e-5 * max(1.0, abs(eval_loss))
    assert grads and set(t_grads) == set(grads)
    for key, expected in grads.items():
        assert relative_error(t_grads[key], expected) <= 1e-5, key
    return train, tiled_plan


@pytest.mark.parametrize(
    ("name", "tiles", "strategy", "train_layers"),
    [
        ("vgg16_style", 4, "overl", 2),
        ("vgg16_style", 8, "2ps", 2),
        ("resnet18", 4, "2ps", 3),
        ("resnet18", 2, "overl", 3),
        ("odd_97", 4, "2ps", 1),
    ],
)
def test_training_artifacts_match_untiled(
    exported: dict[str, Path], tmp_path: Path, name: str, tiles: int, strategy: str, train_layers: int
) -> None:
    train, _ = _assert_tiled_training_matches_untiled(
        exported[name], tmp_path, tiles, strategy, train_layers, trainable=False
    )
    # The frozen bands have no gradient nodes: their activations are not kept for the backward.
    band_tensors = {
        out for node in train.training.graph.node if node.name.startswith("rowtile/") for out in node.output
    }
    readers = [
        n.op_type for n in train.training.graph.node if n.op_type.endswith("Grad") and set(n.input) & band_tensors
    ]
    assert not readers


# A 1x1 stride-2 conv with pad 1 reads only padding for its first output row (row 0 reads input row
# -1). The chain ends at it with 17 exit rows: 9 bands make band 0 that row alone, which no band op
# can compute from input rows, so the chain is left untiled (the pass crashed with a KeyError in
# 2PS); 8 bands give band 0 two rows, one of them real, and tile it.
_PAD_BEYOND_REACH = [
    ConvSpec(8, kernel=5, stride=1, pad=2, relu=True),
    ConvSpec(2, kernel=1, stride=2, pad=1, relu=False),
    ConvSpec(2, kernel=1, relu=False),
]


@pytest.mark.parametrize(("tiles", "strategy"), [(9, "2ps"), (9, "overl"), (8, "2ps")])
def test_conv_padding_beyond_its_kernel_tiles_exactly_or_not_at_all(tmp_path: Path, tiles: int, strategy: str) -> None:
    path = tmp_path / "pad_beyond_reach.onnx"
    onnx.save(tiny_cnn(_PAD_BEYOND_REACH, input_shape=(3, 32, 9), batch=2), str(path))
    base, plan, config = _forward(path, 0)
    tiled, tiled_plan, tiled_config = _forward(path, tiles, strategy)
    band_zero_reads_rows = tiles <= 8  # 17 exit rows split evenly: band 0 is row 0 alone from 9 bands on
    assert bool(_band_nodes(tiled)) == band_zero_reads_rows
    assert bool(tiled_plan.tiled_chains) == band_zero_reads_rows
    x = _input(base)
    y = np.array([1, 3], dtype=np.int64)
    loss, eval_loss, grads, _ = _loss_and_gradients(base, plan, config, tmp_path / "base", x, y)
    t_loss, t_eval_loss, t_grads, _ = _loss_and_gradients(tiled, tiled_plan, tiled_config, tmp_path / "tiled", x, y)
    assert abs(t_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    assert abs(t_eval_loss - eval_loss) <= 1e-5 * max(1.0, abs(eval_loss))
    assert grads and set(t_grads) == set(grads)
    for key, expected in grads.items():
        assert relative_error(t_grads[key], expected) <= 1e-5, key


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_tile_chain_refuses_a_band_of_padding_rows(tmp_path: Path, strategy: str) -> None:
    path = tmp_path / "pad_beyond_reach.onnx"
    onnx.save(tiny_cnn(_PAD_BEYOND_REACH, input_shape=(3, 32, 9), batch=2), str(path))
    base, plan, _ = _forward(path, 0)
    graph = gs.import_onnx(base)
    assert not row_tiling.candidate_chains(graph, plan, 9)  # no candidate has a band of padding rows
    (chain,) = row_tiling.candidate_chains(graph, plan, 8)
    with pytest.raises(ValueError, match=r"band 0 of 9 would read no input rows .*Conv 'conv2'"):
        row_tiling.tile_chain(graph, chain, 9, strategy)


# --------------------------------------------------------------------------------------------
# Execution order: depth-first by band, in the emitted graph and in ORT's profile
# --------------------------------------------------------------------------------------------

_BAND = re.compile(r"^rowtile/(.+?)/band(\d+)/")


def _band_runs(names: list[str]) -> dict[str, list[int]]:
    """Per chain, the band index of each band node in order, with repeats collapsed."""
    runs: dict[str, list[int]] = {}
    for name in names:
        match = _BAND.match(name)
        if match:
            seq = runs.setdefault(match.group(1), [])
            band = int(match.group(2))
            if not seq or seq[-1] != band:
                seq.append(band)
    return runs


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_bands_run_depth_first_in_ort_default_order(exported: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    forward, plan, _ = _forward(exported["resnet18"], 0)
    plan.row_tiles, plan.row_strategy = 4, strategy
    graph = row_tiling.run(gs.import_onnx(forward), plan)
    emitted = _band_runs([node.name for node in graph.nodes])
    assert emitted and all(seq == sorted(set(seq)) for seq in emitted.values()), emitted

    tiled, tiled_plan, _ = _forward(exported["resnet18"], 4, strategy)
    spec = row_tiling.required_session_options(tiled_plan)
    assert spec["execution_order"] == "DEFAULT"
    session = _session(tiled, tiled_plan, profile=str(tmp_path / "profile"))
    session.run(None, {tiled.graph.input[0].name: _input(tiled)})
    events = json.loads(Path(session.end_profiling()).read_text())
    ran = [e["name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    executed = _band_runs(ran)
    assert set(executed) == set(emitted)
    for chain, seq in executed.items():
        # Every band's nodes run as one block: no band starts before the previous one is done.
        assert len(seq) == len(set(seq)), (chain, seq)
        if strategy == "2ps":
            assert seq == sorted(seq), (chain, seq)
    # The pass's model of ORT's order (used for its memory estimates) runs bands as blocks too.
    predicted = _band_runs([node.name for node in row_tiling.ort_default_order(gs.import_onnx(tiled).nodes)])
    assert predicted.keys() == executed.keys() and all(len(s) == len(set(s)) for s in predicted.values())


# --------------------------------------------------------------------------------------------
# Memory: estimates, --memory-budget, and one real measurement
# --------------------------------------------------------------------------------------------


def test_estimated_peak_falls_with_tiles(exported: dict[str, Path]) -> None:
    forward, plan, _ = _forward(exported["vgg16_style"], 0)
    graph = gs.import_onnx(forward)
    peaks = row_tiling.peak_by_tiles(graph, plan, [0, 2, 4, 8], "overl")
    assert peaks[0] > peaks[2] > peaks[4] > peaks[8]
    assert peaks[8] <= 0.4 * peaks[0]
    # Every conv trains and is tiled: the saved activations shrink to the chain boundaries.
    forward, plan, _ = _forward(exported["vgg16_style"], 0, train_layers=8, trainable=True)
    peaks = row_tiling.peak_by_tiles(gs.import_onnx(forward), plan, [0, 8], "overl")
    assert peaks[8] <= 0.5 * peaks[0]


def test_memory_budget_picks_the_smallest_k(exported: dict[str, Path]) -> None:
    forward, plan, _ = _forward(exported["vgg16_style"], 0)
    peaks = row_tiling.peak_by_tiles(gs.import_onnx(forward), plan, [0, 3, 4], "overl")
    budget = (peaks[4] + 1) / row_tiling.MIB
    tiles = row_tiling.tiles_for_budget(forward, plan, budget, "overl")
    assert 2 <= tiles <= 4 and (tiles == 4 or peaks[3] <= budget * row_tiling.MIB)
    assert row_tiling.tiles_for_budget(forward, plan, 10 * peaks[0] / row_tiling.MIB, "overl") == 0
    with pytest.raises(ValueError, match=r"cannot be met: the smallest estimated peak is .* --memory-budget \d+"):
        row_tiling.tiles_for_budget(forward, plan, 0.01, "overl")
    assert row_tiling.smallest_feasible_tiles({0: 100, 2: 60, 4: 40, 8: 30}, 50) == 4


def test_session_options_for_tiled_artifacts() -> None:
    from passes.base import Plan

    plan = Plan(convs=[], row_tiles=8)
    untiled = row_tiling.required_session_options(plan)  # asked for 8 tiles, but no chain was tiled
    plan.generated.chain_scopes["pool1"] = "rowtile/pool1"
    tiled = row_tiling.required_session_options(plan)
    assert untiled == row_tiling.required_session_options(Plan(convs=[]))
    assert tiled == {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_order": "DEFAULT",
        "enable_cpu_mem_arena": False,
        "enable_mem_pattern": False,
        "enable_mem_reuse": False,
    }
    assert row_tiling.required_session_options(Plan(convs=[]))["enable_cpu_mem_arena"] is True


def _pooled_chain() -> nn.Module:
    """Three 32-channel 3x3 convs ending in a 4x4 max-pool: the memory tests' chain."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        _Head(32),
    ).eval()


@pytest.mark.skipif(not CAN_MEASURE, reason=SKIP_REASON)
def test_tiled_frozen_forward_really_uses_less_memory(tmp_path: Path) -> None:
    # A 32-channel chain at 384x384 ending in a 4x4 pool: 18 MiB per intermediate untiled.
    model = _pooled_chain()
    from models.export import export_onnx

    path = export_onnx(model, tmp_path / "chain.onnx", input_shape=(1, 3, 384, 384))
    peaks = {}
    for tiles in (0, 8):
        forward, _, _ = _forward(path, tiles, "overl", batch=1)
        file = tmp_path / f"forward_{tiles}.onnx"
        onnx.save(forward, str(file))
        peaks[tiles] = forward_peak_bytes(file, (1, 3, 384, 384))
    assert peaks[8] < 0.5 * peaks[0], peaks


# --------------------------------------------------------------------------------------------
# Trainable tiling: row_recompute (training stage)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tiles", "strategy", "train_layers"),
    [
        ("vgg16_style", 4, "overl", 8),  # every conv trains; the second chain's entry needs a gradient
        ("vgg16_style", 2, "2ps", 8),
        ("vgg16_style", 4, "2ps", 8),
        ("vgg16_style", 8, "2ps", 5),  # frozen and trainable 2PS chains
        ("resnet18_96", 4, "overl", 20),  # residual adds and a stride-2 block inside trainable chains
        ("resnet18_96", 8, "2ps", 20),
        ("resnet18", 2, "2ps", 20),
        ("odd_97", 4, "overl", 5),  # ceil-mode pool, padded average pool, grouped conv
        ("odd_97", 4, "2ps", 5),
        ("odd_225", 8, "2ps", 5),
        ("dilated", 2, "overl", 5),
        ("dilated", 4, "2ps", 5),
    ],
)
def test_trainable_tiling_with_recompute_is_exact(
    exported: dict[str, Path], tmp_path: Path, name: str, tiles: int, strategy: str, train_layers: int
) -> None:
    train, tiled_plan = _assert_tiled_training_matches_untiled(
        exported[name], tmp_path, tiles, strategy, train_layers, trainable=True
    )
    graph = gs.import_onnx(train.training)
    chains = row_recompute.tiled_bands(graph, tiled_plan.generated.chain_scopes)
    trainable_chains = {chain for chain, bands in chains.items() if any(b.backward for b in bands.values())}
    assert trainable_chains, "no trainable chain was tiled"
    for chain in trainable_chains:
        for band in chains[chain].values():
            originals = {t.name for node in band.forward if "/recompute" not in node.name for t in node.outputs}
            # Gradient nodes read only the recomputed copies; the originals die in the forward.
            assert not [n.name for n in band.backward if {t.name for t in n.inputs if t is not None} & originals]
    if strategy == "2ps":
        # Trainable chains use 2PS too (no silent OverL fallback): bands hand rows over.
        for chain in trainable_chains:
            assert any("/carry" in n.name for band in chains[chain].values() for n in band.forward), chain
    # The entry gradient is assembled from band rows: no per-band, full-size SliceGrad of the entry.
    assert not [n.name for n in graph.nodes if n.op == "SliceGrad" and re.search(r"/band\d+/entry_Grad", n.name)]
    for node in graph.nodes:
        if node.op == "MaxPool" and len(node.outputs) == 2:
            assert node.outputs[1].outputs, f"{node.name} keeps an indices output nobody reads"


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
@pytest.mark.parametrize(("name", "tiles"), [("vgg16_style", 4), ("mobilenet_v2", 2), ("resnet18_96", 8)])
def test_every_trainable_chain_tiled_is_exact(
    exported: dict[str, Path], tmp_path: Path, name: str, tiles: int, strategy: str
) -> None:
    # Every conv trains and every shortest tileable chain is tiled (not only those select_chains
    # picks), so chains start inside the net and their entries need a gradient.
    _, plan, _ = _forward(exported[name], 0)
    convs = len(plan.convs)
    base, plan, config = _forward(exported[name], 0, train_layers=convs, trainable=True)
    graph = gs.import_onnx(base)
    chains = row_tiling.candidate_chains(graph, plan, tiles)
    assert sum(chain.trainable for chain in chains) >= 2
    for chain in chains:
        # Tiled here rather than by the pass: publish the band scopes as the pass does, for row_recompute.
        plan.generated.chain_scopes[chain.name] = row_tiling.tile_chain(graph, chain, tiles, strategy).scope
    tiled = gs.export_onnx(graph.cleanup().toposort())
    x, y = _input(base), np.array([4, 0], dtype=np.int64)
    loss, _, grads, _ = _loss_and_gradients(base, plan, config, tmp_path / "base", x, y)
    t_loss, _, t_grads, train = _loss_and_gradients(tiled, plan, config, tmp_path / "tiled", x, y)
    assert abs(t_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    for key, expected in grads.items():
        assert relative_error(t_grads[key], expected) <= 1e-5, key
    names = [node.name for node in train.training.graph.node]
    # Entry gradients are assembled once per chain, never as K full-size SliceGrads (a chain
    # whose first band reads the whole entry, as 2PS does in a short 4-row chain, keeps one).
    assert any(name.endswith("/backward/entry_grad") for name in names)
    per_chain: dict[str, int] = {}
    for match in filter(None, (re.match(r"^rowtile/(.+?)/band\d+/entry_Grad/SliceGrad", n) for n in names)):
        per_chain[match.group(1)] = per_chain.get(match.group(1), 0) + 1
    assert all(count == 1 for count in per_chain.values()), per_chain


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_recompute_runs_band_by_band_in_the_backward(exported: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    tiled, plan, config = _forward(exported["vgg16_style"], 4, strategy, 8, trainable=True)
    train = build_backward(tiled, plan, config, tmp_path)
    training = run_passes((row_recompute,), train.training, plan, stage="training")
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    spec = row_tiling.required_session_options(plan)
    options = ort.SessionOptions()
    options.execution_order = getattr(ort.ExecutionOrder, spec["execution_order"])
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.log_severity_level = 3
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, None, session_options=options)
    module.train()
    module(_input(tiled), np.array([0, 1], dtype=np.int64))
    del module
    profile = max(tmp_path.glob("profile*.json"), key=lambda p: p.stat().st_mtime)
    events = json.loads(profile.read_text())
    ran = [e["name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    backward: dict[str, list[int]] = {}
    for name in ran:
        match = _BAND.match(name)
        if match and ("/recompute" in name or "_Grad/" in name):
            seq = backward.setdefault(match.group(1), [])
            if not seq or seq[-1] != int(match.group(2)):
                seq.append(int(match.group(2)))
    assert backward
    for chain, seq in backward.items():
        # Recompute + backward of one band at a time, last band first.
        assert seq == sorted(set(seq), reverse=True), (chain, seq)
    first_grad = next(i for i, name in enumerate(ran) if "_Grad/" in name or "Grad_" in name)
    first_recompute = next(i for i, name in enumerate(ran) if "/recompute" in name)
    assert first_recompute > first_grad  # recomputation happens in the backward, not in the forward
    # Partial weight gradients are added as their band finishes: add i (which adds band 3 - i's
    # gradient, K = 4) runs before band 2 - i is recomputed, so K partials never pile up.
    entries = [
        (i, int(m.group(1))) for i, name in enumerate(ran) if (m := re.search(r"/band(\d+)/entry/recompute", name))
    ]
    # (Parameter gradients only: a band's own activation-gradient sums are named after the band.)
    params = [(i, name) for i, name in enumerate(ran) if not name.startswith("rowtile/")]
    adds = [(i, int(m.group(1))) for i, name in params if (m := re.search(r"_grad/add(\d+)_kernel", name))]
    assert adds
    for position, index in adds:
        if index < 3:
            following = next((band for i, band in entries if i > position), None)
            assert following == 2 - index, (ran[position], following)


@pytest.mark.skipif(not CAN_MEASURE, reason=SKIP_REASON)
@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_trainable_tiling_really_uses_less_memory(tmp_path: Path, strategy: str) -> None:
    # Every conv trains: untiled, the backward keeps all four 32 x 256 x 256 activations.
    model = _pooled_chain()
    from models.export import export_onnx

    path = export_onnx(model, tmp_path / "chain.onnx", input_shape=(1, 3, 256, 256))
    peaks = {}
    for tiles in (0, 8):
        forward, plan, config = _forward(path, tiles, strategy, train_layers=4, batch=1, trainable=True)
        out = tmp_path / f"art{tiles}"
        train = build_backward(forward, plan, config, out)
        onnx.save(
            run_passes((row_recompute,), train.training, plan, stage="training"), str(out / "training_model.onnx")
        )
        peaks[tiles] = training_step_peak_bytes(out, (1, 3, 256, 256), [1], mem_reuse=False)
    assert peaks[8] < 0.5 * peaks[0], peaks


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_both_passes_are_idempotent(exported: dict[str, Path], tmp_path: Path, strategy: str) -> None:
    # A second run must not tile the bands again (nested rowtile/rowtile/... bands) nor copy the
    # copies: ORT's common-subexpression elimination would merge such copies, which carry no
    # ordering edge, back into the forward originals and keep every band alive until the backward.
    tiled, plan, config = _forward(exported["vgg16_style"], 4, strategy, 8, trainable=True)
    again = run_passes((row_tiling,), tiled, plan, stage="forward")
    names = {n.name for n in again.graph.node}
    # (It may tile a chain the first run left alone: the peak it had to stay under is lower now.)
    assert {n.name for n in tiled.graph.node if n.name.startswith("rowtile/")} <= names
    assert not [name for name in names if name.startswith("rowtile/rowtile/")]
    train = build_backward(tiled, plan, config, tmp_path)
    once = run_passes((row_recompute,), train.training, plan, stage="training")
    twice = run_passes((row_recompute,), once, plan, stage="training")
    assert sorted(n.name for n in twice.graph.node) == sorted(n.name for n in once.graph.node)
    assert not [n.name for n in twice.graph.node if n.name.endswith("/recompute/recompute")]


def test_recompute_composes_with_gradient_filter_and_relu_masks(exported: dict[str, Path], tmp_path: Path) -> None:
    from gfcompile.pipeline import TRAINING_PASSES

    def compile_step(tiles: int, out: Path):
        config = CompileConfig(filter_layers=2, train_layers=8, batch_size=2, row_tiles=tiles)
        model = pin_shapes(load_and_validate(exported["vgg16_style"]), config)
        plan = select_layers(model, config)
        plan.row_tile_trainable = True
        forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
        train = build_backward(forward, plan, config, out)
        training = run_passes(TRAINING_PASSES, train.training, plan, stage="training")
        onnx.save(training, str(out / "training_model.onnx"))
        api = training_api()
        state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
        module = api.Module(str(out / "training_model.onnx"), state, None)
        module.train()
        loss = float(np.asarray(module(x, y)[0]))
        return loss, {name: state.parameters[name].grad.copy() for name in plan.trainable_params}, training, plan

    base, _, _ = _forward(exported["vgg16_style"], 0)
    x, y = _input(base), np.array([2, 4], dtype=np.int64)
    loss, grads, _, _ = compile_step(0, tmp_path / "base")
    t_loss, t_grads, training, plan = compile_step(4, tmp_path / "tiled")
    assert abs(t_loss - loss) <= 1e-5 * max(1.0, abs(loss))
    for key, expected in grads.items():
        assert relative_error(t_grads[key], expected) <= 1e-5, key
    names = [node.name for node in training.graph.node]
    assert any(name.endswith("/recompute") for name in names)
    assert not any(name.startswith("rowtile/") and f"{conv}" in name for conv in plan.filtered for name in names)
    # activation_mask's Where/Greater on band ReLUs: the masks come from the recomputed band.
    graph = gs.import_onnx(training)
    for chain in row_recompute.tiled_bands(graph, plan.generated.chain_scopes).values():
        for band in chain.values():
            originals = {t.name for node in band.forward if "/recompute" not in node.name for t in node.outputs}
            assert not [n.name for n in band.backward if {t.name for t in n.inputs if t is not None} & originals]
