"""The gradient-filtering pass against the independent float64 numpy reference.

Two levels:
- a fast sweep over conv forms, on a two-node graph (Conv + com.microsoft::ConvGrad)
  run in an InferenceSession after the pass;
- end-to-end: tiny models through ORT's `generate_artifacts`, the pass on
  training_model.onnx, then real training steps with `onnxruntime.training.api`.

grad_x is read exactly through a trainable zero tensor `x_shift` added to the conv's
input (`x = input + x_shift`, so x_shift.grad == grad_x), and once more through the
chain conv1 -> BN affine -> ReLU -> conv2, where conv1's grad_W implies grad_x.
The MSE loss makes g_y analytic: 2 * (y - target) / numel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import geometry
from passes import gradient_filter as gf
from passes.base import ConvLayer, Plan
from runtime.ort_training import training_submodule
from tests.reference.gradient_filter_numpy import gradient_filter_backward

TOL = 1e-5
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30))


def conv_out(size: int, k: int, s: int, pad_total: int, d: int) -> int:
    return (size + pad_total - d * (k - 1) - 1) // s + 1


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides, pads, dilations, group: int) -> np.ndarray:
    """Float64 grouped/dilated/strided Conv (ONNX semantics), one shifted slice per tap."""
    n, c_in, h, wd = x.shape
    c_out, cin_g, k_h, k_w = w.shape
    (s_h, s_w), (d_h, d_w) = strides, dilations
    h_y = conv_out(h, k_h, s_h, pads[0] + pads[2], d_h)
    w_y = conv_out(wd, k_w, s_w, pads[1] + pads[3], d_w)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    xg = xp.reshape(n, group, cin_g, *xp.shape[2:])
    wg = w.astype(np.float64).reshape(group, c_out // group, cin_g, k_h, k_w)
    y = np.zeros((n, group, c_out // group, h_y, w_y))
    for u, v in itertools.product(range(k_h), range(k_w)):
        tap = xg[..., u * d_h : u * d_h + s_h * (h_y - 1) + 1 : s_h, v * d_w : v * d_w + s_w * (w_y - 1) + 1 : s_w]
        y += np.einsum("goc,ngchw->ngohw", wg[..., u, v], tap)
    y = y.reshape(n, c_out, h_y, w_y)
    return y if b is None else y + b.astype(np.float64)[None, :, None, None]


def make_layer(name: str, inp: str, out: str, weight: str, bias: str | None, x_shape, w_shape, attrs) -> ConvLayer:
    k = tuple(w_shape[2:])
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    y_shape = (
        x_shape[0],
        w_shape[0],
        conv_out(x_shape[2], k[0], strides[0], pads[0] + pads[2], dilations[0]),
        conv_out(x_shape[3], k[1], strides[1], pads[1] + pads[3], dilations[1]),
    )
    return ConvLayer(
        node=name,
        index=0,
        input=inp,
        output=out,
        weight=weight,
        bias=bias,
        x_shape=tuple(x_shape),
        y_shape=y_shape,
        kernel=k,
        strides=strides,
        pads=pads,
        dilations=dilations,
        group=attrs.get("group", 1),
    )


# --------------------------------------------------------------------------------------
# Fast sweep: Conv + ConvGrad in an InferenceSession.
# --------------------------------------------------------------------------------------


def value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def run_conv_grad_graph(
    layer: ConvLayer,
    r: int,
    *,
    need_dx: bool = True,
    paper: bool = False,
    seed: int = 0,
    node_names: list[str] | None = None,
) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    c_out = layer.y_shape[1]
    w_shape = (c_out, layer.x_shape[1] // layer.group, *layer.kernel)
    x = rng.standard_normal(layer.x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    g_y = rng.standard_normal(layer.y_shape).astype(np.float32)
    attrs = {
        "kernel_shape": list(layer.kernel),
        "strides": list(layer.strides),
        "pads": list(layer.pads),
        "dilations": list(layer.dilations),
        "group": layer.group,
    }
    outputs = ["dx" if need_dx else "", "dw", "db"]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs),
        helper.make_node("ConvGrad", ["gy", "x", "w"], outputs, name="conv_grad", domain="com.microsoft", **attrs),
    ]
    graph_outputs = [value("y", layer.y_shape), value("dw", w_shape), value("db", (c_out,))]
    if need_dx:
        graph_outputs.append(value("dx", layer.x_shape))
    inputs = [value("x", layer.x_shape), value("w", w_shape), value("b", (c_out,)), value("gy", layer.y_shape)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, graph_outputs), opset_imports=OPSETS)
    model.ir_version = 9
    graph = gf.run(gs.import_onnx(model), Plan(convs=[layer], filtered={layer.node: r}, paper_stride_scaling=paper))
    assert not [n for n in graph.nodes if n.op == "ConvGrad"]
    if node_names is not None:
        node_names.extend(n.name for n in graph.nodes)
    rewritten = gs.export_onnx(graph)
    onnx.checker.check_model(rewritten, full_check=True)
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "w": w, "b": np.zeros(c_out, np.float32), "gy": g_y}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    expected = gradient_filter_backward(
        x, w, g_y, layer.strides, layer.pads, layer.dilations, layer.group, r, paper_stride_scaling=paper
    )
    return got, expected


def _sweep_cases() -> list[tuple]:
    # (k, stride, same?, dilation, groups kind, r, H): every listed form at least once,
    # combined pseudo-randomly to keep the count small.
    rng = np.random.default_rng(1234)
    cases = []
    for k, s, same, d, kind in itertools.product((1, 3, 5, 7), (1, 2), (True, False), (1, 2, 12), ("g1", "dw", "g2")):
        if k == 1 and d > 1:
            continue
        r = int(rng.choice([1, 2, 3, 4, 5, 8]))
        h = int(rng.choice([7, 13, 15, 16]))
        cases.append((k, s, same, d, kind, r, h))
    return cases


SWEEP = _sweep_cases()


# The pass picks its op forms by size (one-pass MatMul pooling of g_y, one GEMM over
# batch x patches); the sweep's small maps would take only the small-size forms, so every
# form is forced once by the module's size limits.
_LIMITS = ("_ONE_PASS_MAX_OUTPUTS", "_ONE_PASS_MAX_OUTPUTS_TWO_ROWS", "_SEPARABLE_MAX_OUTPUTS", "_ONE_GEMM_MAX_PATCHES")
PATHS = {
    "by-size": {},
    "staged": dict.fromkeys(_LIMITS, 0),
    "separable": {**dict.fromkeys(_LIMITS, 0), "_SEPARABLE_MAX_OUTPUTS": 10**9},
    "one-pass": dict.fromkeys(_LIMITS, 10**9),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_conv_forms_match_reference(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # One test over all SWEEP cases (about 1 s): a failure lists every failing form at once.
    for limit, value in PATHS[path].items():
        monkeypatch.setattr(gf, limit, value)
    failures = []
    forms: set[str] = set()
    for i, (k, s, same, d, kind, r, h) in enumerate(SWEEP):
        c_in, c_out, group = {"g1": (3, 5, 1), "dw": (4, 4, 4), "g2": (4, 6, 2)}[kind]
        pad = d * (k - 1) // 2 if same else 0
        if conv_out(h, k, s, 2 * pad, d) < 1:
            continue
        attrs = {"strides": (s, s), "pads": (pad,) * 4, "dilations": (d, d), "group": group}
        layer = make_layer("conv", "x", "y", "w", "b", (2, c_in, h, h + 2), (c_out, c_in // group, k, k), attrs)
        names: list[str] = []
        got, (gx, gw, gb) = run_conv_grad_graph(layer, r, seed=i, node_names=names)
        forms |= {name.removeprefix("conv/gf/") for name in names}
        errs = {"dx": rel_err(got["dx"], gx), "dw": rel_err(got["dw"], gw), "db": rel_err(got["db"], gb)}
        if max(errs.values()) > TOL:
            failures.append(((k, s, same, d, kind, r, h), errs))
    assert not failures, failures
    # The forced paths really ran: MatMul pooling and channel-major GEMMs, or neither.
    one_pass = {"g_pool_mm", "g_major", "x_major"}
    if path == "staged":
        assert not one_pass & forms and {"g_pool_wsum", "g_pool_hsum", "gw_sum"} <= forms
        assert "g_pool_sep_cols" not in forms
    if path == "separable":
        assert {"g_pool_sep_cols", "g_pool_sep_rows"} <= forms
    if path == "one-pass":
        assert one_pass <= forms and "gw_sum" in forms  # gw_sum: depthwise Mul+ReduceSum
        assert "g_pool_hsum" not in forms


# id: (x_shape, w_shape, conv attrs, r, need grad_x, paper_stride_scaling)
SPECIAL = {
    "multiplier-dw": ((2, 2, 9, 11), (6, 1, 3, 3), {"pads": (1,) * 4, "group": 2}, 2, True, False),
    "asym-pads": ((2, 3, 8, 8), (4, 3, 3, 3), {"strides": (2, 2), "pads": (0, 0, 1, 1)}, 2, True, False),
    "pad-ge-window": ((2, 3, 8, 8), (4, 3, 1, 1), {"pads": (3, 3, 3, 3)}, 1, True, False),
    "r-gt-Hy-only": ((2, 3, 5, 20), (4, 3, 3, 3), {"pads": (1,) * 4}, 8, True, False),
    "rect-kernel": ((2, 3, 9, 10), (4, 3, 3, 5), {"strides": (2, 1), "pads": (1, 2, 1, 2)}, 3, True, False),
    "aspp-d36-centre-tap": ((2, 4, 13, 13), (4, 4, 3, 3), {"pads": (36,) * 4, "dilations": (36, 36)}, 2, True, False),
    "aspp-d24-r8": ((2, 4, 13, 13), (4, 4, 3, 3), {"pads": (24,) * 4, "dilations": (24, 24)}, 8, True, False),
    "k5-d6-3-taps": ((2, 4, 10, 10), (4, 4, 5, 5), {"pads": (12,) * 4, "dilations": (6, 6)}, 2, True, False),
    "mixed-dilation": ((2, 4, 9, 9), (4, 4, 3, 3), {"pads": (6, 2, 6, 2), "dilations": (6, 2)}, 3, True, False),
    "paper-scaling": ((2, 3, 9, 8), (4, 3, 3, 3), {"strides": (2, 2), "pads": (1,) * 4}, 2, True, True),
    "no-grad-x": ((2, 3, 15, 15), (4, 3, 3, 3), {"strides": (2, 2)}, 3, False, False),
}


@pytest.mark.parametrize(("x_shape", "w_shape", "attrs", "r", "need_dx", "paper"), SPECIAL.values(), ids=SPECIAL)
def test_special_forms_match_reference(x_shape, w_shape, attrs, r, need_dx, paper) -> None:
    layer = make_layer("conv", "x", "y", "w", "b", x_shape, w_shape, attrs)
    got, (gx, gw, gb) = run_conv_grad_graph(layer, r, need_dx=need_dx, paper=paper)
    assert rel_err(got["dw"], gw) <= TOL
    assert rel_err(got["db"], gb) <= TOL
    if need_dx:
        assert rel_err(got["dx"], gx) <= TOL


# --------------------------------------------------------------------------------------
# End-to-end through generate_artifacts and onnxruntime.training.api.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One tiny model whose conv `conv2` is filtered with patch size r.

    mode: "shift"  x = input + x_shift (trainable zeros) -> conv2: grad_x read exactly;
          "chain"  input -> conv1 (1x1, identity) -> BN affine -> ReLU -> conv2;
          "first"  input -> conv2 directly (ORT requests no grad_x: empty ConvGrad output).
    """

    mode: str
    x_shape: tuple[int, int, int, int]
    w_shape: tuple[int, int, int, int]
    attrs: dict
    r: int
    bias: bool = True
    paper: bool = False
    auto_pad: str | None = None
    first_r: int = 0  # chain mode: also filter conv1 with this patch size


E2E = {
    "k3s1-same-r2": Case("shift", (2, 4, 8, 8), (6, 4, 3, 3), {"pads": (1,) * 4}, 2),
    "k3s1-odd7-r2": Case("shift", (2, 3, 7, 7), (5, 3, 3, 3), {"pads": (1,) * 4}, 2),
    "k3s2-odd15-r3": Case("shift", (2, 3, 15, 15), (4, 3, 3, 3), {"strides": (2, 2), "pads": (1,) * 4}, 3),
    "k3s2-valid13-r2": Case("shift", (2, 3, 13, 13), (4, 3, 3, 3), {"strides": (2, 2)}, 2, bias=False),
    "k1-r4": Case("shift", (2, 4, 12, 12), (3, 4, 1, 1), {}, 4),
    "k5-dw-r3": Case("shift", (2, 4, 13, 13), (4, 1, 5, 5), {"pads": (2,) * 4, "group": 4}, 3),
    "k7s2-g2-r2": Case("shift", (2, 4, 16, 16), (6, 2, 7, 7), {"strides": (2, 2), "pads": (3,) * 4, "group": 2}, 2),
    "k3-valid-r8-gt-Hy": Case("shift", (2, 3, 7, 9), (4, 3, 3, 3), {}, 8),
    "k3-d2-r4": Case("shift", (2, 3, 12, 12), (4, 3, 3, 3), {"pads": (2,) * 4, "dilations": (2, 2)}, 4),
    "aspp-d12-r2": Case("shift", (2, 4, 13, 13), (4, 4, 3, 3), {"pads": (12,) * 4, "dilations": (12, 12)}, 2),
    "k3s1-r1": Case("shift", (2, 3, 8, 8), (4, 3, 3, 3), {"pads": (1,) * 4}, 1),
    # SAME_UPPER on 8 rows, k=3, s=2 pads (0, 1); the plan below is left with zero pads,
    # which the pass must resolve from the node's auto_pad.
    "auto-pad-s2-paper": Case(
        "shift",
        (2, 3, 8, 8),
        (4, 3, 3, 3),
        {"strides": (2, 2), "pads": (0, 0, 1, 1)},
        2,
        paper=True,
        auto_pad="SAME_UPPER",
    ),
    "chain-bn-relu-r2": Case("chain", (2, 4, 10, 10), (5, 4, 3, 3), {"pads": (1,) * 4}, 2),
    "chain-both-filtered": Case("chain", (2, 4, 10, 10), (5, 4, 3, 3), {"pads": (1,) * 4}, 2, first_r=4),
    "first-layer-r2": Case("first", (2, 3, 9, 9), (4, 3, 3, 3), {"pads": (1,) * 4}, 2),
}


@dataclass
class Built:
    model: onnx.ModelProto
    layer: ConvLayer
    params: dict[str, np.ndarray]
    bn: tuple[np.ndarray, np.ndarray] | None


def build_model(case: Case, seed: int = 0) -> Built:
    rng = np.random.default_rng(seed)
    n, c_in, h, w = case.x_shape
    c_out = case.w_shape[0]
    params: dict[str, np.ndarray] = {
        "w2": (rng.standard_normal(case.w_shape) / np.sqrt(np.prod(case.w_shape[1:]))).astype(np.float32)
    }
    if case.bias:
        params["b2"] = rng.standard_normal(c_out).astype(np.float32) * 0.1
    conv_inputs = ["x", "w2", "b2"] if case.bias else ["x", "w2"]
    attrs = dict(case.attrs)
    onnx_attrs = {"kernel_shape": list(case.w_shape[2:])}
    for key in ("strides", "dilations", "group"):
        if key in attrs:
            onnx_attrs[key] = list(attrs[key]) if key != "group" else attrs[key]
    if case.auto_pad:
        onnx_attrs["auto_pad"] = case.auto_pad
    elif "pads" in attrs:
        onnx_attrs["pads"] = list(attrs["pads"])
    nodes, consts, bn = [], [], None
    if case.mode == "shift":
        params["x_shift"] = np.zeros(case.x_shape, np.float32)
        nodes.append(helper.make_node("Add", ["input", "x_shift"], ["x"], name="shift"))
    elif case.mode == "chain":
        params["w1"] = np.eye(c_in, dtype=np.float32).reshape(c_in, c_in, 1, 1)
        params["b1"] = np.zeros(c_in, np.float32)
        scale = (0.5 + rng.random(c_in)).astype(np.float32).reshape(1, c_in, 1, 1)
        shift = (0.3 * rng.standard_normal(c_in)).astype(np.float32).reshape(1, c_in, 1, 1)
        bn = (scale, shift)
        consts += [numpy_helper.from_array(scale, "bn_scale"), numpy_helper.from_array(shift, "bn_shift")]
        nodes += [
            helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
            helper.make_node("Mul", ["c1", "bn_scale"], ["bn_scaled"], name="bn/mul"),
            helper.make_node("Add", ["bn_scaled", "bn_shift"], ["bn_out"], name="bn/add"),
            helper.make_node("Relu", ["bn_out"], ["x"], name="relu"),
        ]
    else:
        conv_inputs[0] = "input"
    nodes.append(helper.make_node("Conv", conv_inputs, ["output"], name="conv2", **onnx_attrs))

    layer = make_layer(
        "conv2", conv_inputs[0], "output", "w2", "b2" if case.bias else None, case.x_shape, case.w_shape, attrs
    )
    inits = consts + [numpy_helper.from_array(v, k) for k, v in params.items()]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, c_in, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(layer.y_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return Built(model, layer, params, bn)


def make_artifacts(built: Built, directory: Path) -> None:
    artifacts = training_submodule("artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(
        built.model,
        requires_grad=list(built.params),
        frozen_params=[],
        loss=artifacts.LossType.MSELoss,
        optimizer=artifacts.OptimType.SGD,
        artifact_directory=str(directory),
    )


def apply_pass(directory: Path, plan: Plan) -> tuple[gs.Graph, gs.Graph]:
    """Run the pass on training_model.onnx in place; returns (graph before, graph after)."""
    path = directory / "training_model.onnx"
    original = onnx.load(path)
    before = gs.import_onnx(original)
    after = gf.run(gs.import_onnx(original), plan)
    exported = gs.export_onnx(after)
    exported.ir_version = original.ir_version
    del exported.opset_import[:]
    exported.opset_import.extend(original.opset_import)
    onnx.save(exported, path)
    return before, after


def reference(built: Built, case: Case, inp: np.ndarray, target: np.ndarray) -> dict:
    """Loss and the filtered gradients of every parameter, from the numpy reference."""
    layer, p = built.layer, built.params
    x = inp.astype(np.float64)
    if case.mode == "shift":
        x = x + p["x_shift"]
    if case.mode == "chain":
        scale, shift = built.bn
        pre = x * scale + shift  # conv1 is the identity with zero bias
        x = np.maximum(pre, 0)
    y = conv2d(x, p["w2"], p.get("b2"), layer.strides, layer.pads, layer.dilations, layer.group)
    g_y = 2.0 * (y - target) / y.size
    gx, gw, gb = gradient_filter_backward(
        x, p["w2"], g_y, layer.strides, layer.pads, layer.dilations, layer.group, case.r, case.paper
    )
    out = {"loss": float(np.mean((y - target) ** 2)), "w2": gw}
    if case.bias:
        out["b2"] = gb
    if case.mode == "shift":
        out["x_shift"] = gx
    if case.mode == "chain":
        g_c1 = gx * (pre > 0) * built.bn[0]
        out["w1"] = np.einsum("nohw,nihw->oi", g_c1, inp.astype(np.float64))[:, :, None, None]
        out["b1"] = g_c1.sum(axis=(0, 2, 3))
        if case.first_r:
            one = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
            _, out["w1"], out["b1"] = gradient_filter_backward(inp, p["w1"], g_c1, *one, case.first_r)
    return out


def x_pool_chain_ok(graph: gs.Graph, layer: ConvLayer, geom: geometry.FilterGeometry) -> None:
    """x feeds only the forward conv, the pooling chain and (unrelated) ORT gradient nodes,
    and every tensor derived from x on the way to x~ feeds nothing but that chain."""
    tensors = graph.tensors()
    x_pool = tensors[gf.pooled_input_name(layer.node)]
    assert tuple(x_pool.shape) == geom.x_pooled_shape == (layer.x_shape[0], layer.x_shape[1], *geom.grid)
    chain_nodes = set()
    frontier = [x_pool]
    while frontier:  # walk back from x~ to x
        tensor = frontier.pop()
        for node in tensor.inputs:
            if node.name not in chain_nodes:
                chain_nodes.add(node.name)
                frontier += [t for t in node.inputs if t.name != layer.input and not isinstance(t, gs.Constant)]
    x = tensors[layer.input]
    own = [n for n in x.outputs if n.name.startswith(f"{layer.node}/gf/")]
    assert len(own) == 1 and own[0].name in chain_nodes
    for node_name in chain_nodes:
        node = next(n for n in graph.nodes if n.name == node_name)
        for out in node.outputs:
            if out is not x_pool:
                assert all(c.name in chain_nodes for c in out.outputs), (out.name, [c.name for c in out.outputs])


@pytest.mark.parametrize("name", list(E2E))
def test_training_step_matches_reference(tmp_path: Path, name: str) -> None:
    case = E2E[name]
    built = build_model(case)
    make_artifacts(built, tmp_path)
    layers = [replace(built.layer, pads=(0, 0, 0, 0)) if case.auto_pad else built.layer]
    if case.mode == "chain":
        layers.insert(
            0, make_layer("conv1", "input", "c1", "w1", "b1", case.x_shape, (case.x_shape[1],) * 2 + (1, 1), {})
        )
    plan = Plan(
        convs=layers,
        trainable_convs=[layer.node for layer in layers],
        filtered={"conv2": case.r, **({"conv1": case.first_r} if case.first_r else {})},
        trainable_params=list(built.params),
        paper_stride_scaling=case.paper,
    )
    before, after = apply_pass(tmp_path, plan)
    geom = geometry.filter_geometry(built.layer, case.r)

    # Graph checks: ConvGrad of conv2 gone, no backward node reads full-resolution x.
    grads_of_x = [n for n in after.nodes if n.op == "ConvGrad" and n.inputs[1].name == built.layer.input]
    assert not grads_of_x
    x_pool_chain_ok(after, built.layer, geom)
    if case.first_r:
        x_pool_chain_ok(after, layers[0], geometry.filter_geometry(layers[0], case.first_r))
    preexisting = {n.name for n in before.nodes if n.op != "ConvGrad"}
    others = {n.name for n in after.tensors()[built.layer.input].outputs} - {"conv2"}
    others = {n for n in others if not n.startswith("conv2/gf/")}
    assert others <= preexisting
    if case.mode == "chain":
        assert gf.retained_input_readers(after, plan) == {"conv2": ["relu_Grad/ReluGrad_0 (ReluGrad)"]}
    else:
        assert gf.retained_input_readers(after, plan) == {}
    for node in after.nodes:
        assert not any(t.name.endswith("_grad") for t in node.outputs if t.name.startswith("conv2/gf/"))

    train_path = tmp_path / "training_model.onnx"
    model = onnx.load(train_path)
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(str(train_path), providers=["CPUExecutionProvider"])  # ORT's own type/shape inference

    api = training_submodule("api")
    rng = np.random.default_rng(7)
    inp = rng.standard_normal(case.x_shape).astype(np.float32)
    target = rng.standard_normal(built.layer.y_shape).astype(np.float32)
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(train_path), state, str(tmp_path / "eval_model.onnx"))
    module.train()
    loss = float(module(inp, target))
    expected = reference(built, case, inp, target)
    assert abs(loss - expected["loss"]) <= TOL * abs(expected["loss"])
    for param in built.params:
        assert rel_err(state.parameters[param].grad, expected[param]) <= TOL, param


def test_optimizer_steps_after_pass(tmp_path: Path) -> None:
    case = E2E["k3s2-odd15-r3"]
    built = build_model(case)
    make_artifacts(built, tmp_path)
    plan = Plan(convs=[built.layer], trainable_convs=["conv2"], filtered={"conv2": case.r})
    apply_pass(tmp_path, plan)
    api = training_submodule("api")
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    optimizer = api.Optimizer(str(tmp_path / "optimizer_model.onnx"), module)
    lr = optimizer.get_learning_rate()
    rng = np.random.default_rng(3)
    inp = rng.standard_normal(case.x_shape).astype(np.float32)
    target = rng.standard_normal(built.layer.y_shape).astype(np.float32)
    module.train()
    for _ in range(2):
        # The reference at the current parameters (x_shift trains too): after
        # lazy_reset_grad the gradient buffers hold this step's gradients only.
        current = {name: state.parameters[name].data.copy() for name in built.params}
        weight = current["w2"]
        loss = float(module(inp, target))
        grad = state.parameters["w2"].grad.copy()
        assert rel_err(grad, reference(replace(built, params=current), case, inp, target)["w2"]) <= TOL
        optimizer.step()
        module.lazy_reset_grad()
        assert np.isfinite(loss)
        np.testing.assert_allclose(state.parameters["w2"].data, weight - lr * grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# Geometry, cost table and refusals.
# --------------------------------------------------------------------------------------


def test_geometry_and_cost() -> None:
    layer = make_layer("c", "x", "y", "w", None, (1, 128, 120, 160), (128, 128, 3, 3), {"pads": (1,) * 4})
    geom = geometry.filter_geometry(layer, 2)
    assert geom.grid == (60, 80) and geom.patch == (2, 2) and geom.x_aligned and geom.g_aligned
    cost = geometry.filtered_cost(layer, 2)
    assert cost["vanilla_activation_bytes"] == 128 * 120 * 160 * 4
    assert cost["filtered_activation_bytes"] == 128 * 60 * 80 * 4
    macs = 128 * 120 * 160 * 128 * 9
    assert cost["vanilla_backward_flops"] == 4 * macs
    assert cost["filtered_backward_flops"] == 128 * 120 * 160 + 2 * (2 * 128 * 128 * 60 * 80)

    strided = make_layer("s", "x", "y", "w", None, (2, 3, 15, 15), (4, 3, 3, 3), {"strides": (2, 2)})
    geom = geometry.filter_geometry(strided, 2)  # H_y = 7: p = 4, R = 4, 16 - 15 = 1 row of pad
    assert geom.grid == (4, 4) and geom.x_pads == (1, 1, 0, 0) and geom.g_pads == (1, 1, 0, 0)
    valid = make_layer("v", "x", "y", "w", None, (2, 3, 13, 13), (4, 3, 7, 7), {})
    assert geometry.filter_geometry(valid, 8).x_pads == (-2, -2, -3, -3)  # crop: 8 of 13 rows
    aspp = make_layer(
        "a", "x", "y", "w", None, (1, 8, 16, 16), (8, 8, 3, 3), {"pads": (12,) * 4, "dilations": (12, 12)}
    )
    assert geometry.filter_geometry(aspp, 4).reduced_dilations == (3, 3)
    assert geometry.filter_geometry(replace(aspp, dilations=(2, 2), pads=(2,) * 4), 4).reduced_dilations == (0, 0)


def test_refuses_impossible_configs() -> None:
    layer = make_layer("bad_conv", "x", "y", "w", None, (2, 4, 8, 8), (4, 4, 3, 3), {"pads": (1,) * 4})
    with pytest.raises(ValueError, match="bad_conv"):
        geometry.filter_geometry(layer, 0)
    with pytest.raises(ValueError, match="bad_conv"):
        geometry.filter_geometry(replace(layer, group=3), 2)
    with pytest.raises(ValueError, match="bad_conv"):
        geometry.filter_geometry(replace(layer, y_shape=(2, 4, 7, 8)), 2)
    with pytest.raises(ValueError, match="bad_conv"):
        geometry.filter_geometry(replace(layer, x_shape=(2, 4, -1, 8)), 2)
    # A conv without a ConvGrad (frozen) cannot be filtered.
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="bad_conv", pads=[1, 1, 1, 1])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
            [numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "w")],
        )
    )
    with pytest.raises(ValueError, match="bad_conv.*ConvGrad"):
        gf.run(gs.import_onnx(model), Plan(convs=[layer], filtered={"bad_conv": 2}))
    with pytest.raises(ValueError, match="missing"):
        gf.run(gs.import_onnx(model), Plan(convs=[layer], filtered={"missing": 2}))
