"""Suite `layers`: the gradient-filtering paper's per-layer backward microbenchmark, in ORT.

For a 3x3, stride-1, pad-1 conv with C_in = C_out = C it times, each configuration in its
own worker process, one InferenceSession run of
  (i)  the exact backward: com.microsoft::ConvGrad(dY, X, W) -> (dX, dW, dB);
  (ii) the gradient-filtered backward for r = 2 and 4, produced by the real pass
       (`passes.gradient_filter.run` on a Conv + ConvGrad graph) and then cut so that
       the timed graph reads dY, x~ (the pooled input, computed in the forward) and W:
       with the upsample (grad_x at full resolution, what training needs) and without it
       (grad_x at patch resolution, what the paper's per-layer figure measures).
Outputs are bound to preallocated numpy buffers (IOBinding), so the time has no copy of
the result in it; where a filtered output is made by a Reshape, the cut ends at the
Reshape's input (a view in training, a copy into the bound buffer here). The with-upsample variant is memory-bound, so it is compared with a
floor: bytes(g_y read once) + bytes(grad_x written once) / the bandwidth of a large numpy
copy measured in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import SuiteContext, SuiteResult, fmt, md_table, repeat_timed, run_worker, timing_stats

# (C, H, W) of the paper's per-layer figure; C_in = C_out = C, 3x3, stride 1, pad 1.
PAPER_SHAPES: tuple[tuple[int, int, int], ...] = (
    (128, 120, 160),
    (256, 60, 80),
    (512, 30, 40),
    (512, 14, 14),
    (256, 14, 14),
    (128, 28, 28),
    (64, 56, 56),
)
# The small end of the list: the quick profile has to finish in CI time.
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((512, 14, 14), (128, 28, 28), (64, 56, 56))
PATCH_SIZES = (2, 4)
# The paper's on-device speed-ups of the filtered backward (no upsample), median over the shapes.
PAPER_SPEEDUP = {2: 20.0, 4: 60.0}
FLOAT_BYTES = 4
CONV = "conv"


@dataclass(frozen=True)
class LayerSettings:
    batch: int
    shapes: tuple[tuple[int, int, int], ...]
    warmup: int
    min_reps: int
    min_time_s: float
    max_reps: int
    bandwidth_mib: int


SETTINGS = {
    "quick": LayerSettings(
        batch=4, shapes=QUICK_SHAPES, warmup=1, min_reps=3, min_time_s=0.1, max_reps=30, bandwidth_mib=128
    ),
    "full": LayerSettings(
        batch=32, shapes=PAPER_SHAPES, warmup=1, min_reps=5, min_time_s=3.0, max_reps=100, bandwidth_mib=512
    ),
}


def variant_key(r: int, upsample: bool) -> str:
    return f"r{r}_{'up' if upsample else 'noup'}"


# --------------------------------------------------------------------------------------
# Graphs (built inside the worker)
# --------------------------------------------------------------------------------------


def conv_layer(c: int, h: int, w: int, batch: int):
    """The plan's view of the benchmarked conv (what `select_layers` would produce)."""
    from passes.base import ConvLayer

    shape = (batch, c, h, w)
    return ConvLayer(
        node=CONV,
        index=0,
        input="x",
        output="y",
        weight="w",
        bias="b",
        x_shape=shape,
        y_shape=shape,
        kernel=(3, 3),
        strides=(1, 1),
        pads=(1, 1, 1, 1),
        dilations=(1, 1),
        group=1,
    )


def _conv_attrs() -> dict[str, Any]:
    return {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}


def _model(nodes: list, inputs: list, outputs: list):
    from onnx import helper

    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "layer_backward", inputs, outputs), opset_imports=opsets)
    model.ir_version = 9  # what ORT 1.19 reads
    return model


def _value(name: str, shape: tuple[int, ...]):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def exact_backward_model(layer):
    """ConvGrad(dY, X, W) -> (dX, dW, dB): what ORT's gradient builder emits for the conv."""
    from onnx import helper

    c_out = layer.y_shape[1]
    w_shape = (c_out, layer.x_shape[1], *layer.kernel)
    node = helper.make_node(
        "ConvGrad", ["gy", "x", "w"], ["dx", "dw", "db"], name="conv_grad", domain="com.microsoft", **_conv_attrs()
    )
    inputs = [_value("gy", layer.y_shape), _value("x", layer.x_shape), _value("w", w_shape)]
    outputs = [_value("dx", layer.x_shape), _value("dw", w_shape), _value("db", (c_out,))]
    return _model([node], inputs, outputs)


def filtered_backward_model(layer, r: int, upsample: bool):
    """The real pass's rewrite of Conv + ConvGrad, cut to the backward: inputs (dY, x~, W).

    x~ is computed in the forward pass of a training step (and is what stays alive in
    memory), so it is an input here; the forward conv and the pooling of x are dropped.
    Without `upsample`, grad_x is taken before its nearest upsampling (patch resolution).
    """
    import onnx_graphsurgeon as gs
    from onnx import helper

    from passes import gradient_filter as gf
    from passes.base import Plan
    from passes.names import GX_HAT, X_POOL

    c_out = layer.y_shape[1]
    w_shape = (c_out, layer.x_shape[1], *layer.kernel)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name=CONV, **_conv_attrs()),
        helper.make_node(
            "ConvGrad", ["gy", "x", "w"], ["dx", "dw", "db"], name="conv_grad", domain="com.microsoft", **_conv_attrs()
        ),
    ]
    inputs = [_value("x", layer.x_shape), _value("w", w_shape), _value("b", (c_out,)), _value("gy", layer.y_shape)]
    outputs = [_value("y", layer.y_shape), _value("dx", layer.x_shape), _value("dw", w_shape), _value("db", (c_out,))]
    plan = Plan(convs=[layer], trainable_convs=[CONV], filtered={CONV: r})
    graph = gf.run(gs.import_onnx(_model(nodes, inputs, outputs)), plan)

    tensors = graph.tensors()
    x_pool = tensors[plan.generated.filter_tensor(CONV, X_POOL)]
    x_pool.inputs.clear()  # detach from the pooling chain: x~ becomes a graph input
    grad_x = tensors["dx"]
    if not upsample:
        hat = plan.generated.filter_tensor(CONV, GX_HAT)
        if hat not in tensors:
            raise RuntimeError(f"the pass wrote no grad_x at patch resolution ({hat!r}); update {__name__}")
        grad_x = tensors[hat]
    graph.inputs = [tensors["gy"], x_pool, tensors["w"]]
    graph.outputs = [_before_reshape(t) for t in (grad_x, tensors["dw"], tensors["db"])]
    graph.cleanup().toposort()
    ops = sorted({node.op for node in graph.nodes})
    if "Conv" in ops or "ConvGrad" in ops or "x" in graph.tensors():
        raise RuntimeError(f"the cut filtered backward still reads x or runs a conv: {ops}")
    model = gs.export_onnx(graph)
    model.ir_version = 9
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model


def _before_reshape(tensor):
    """The tensor a trailing Reshape views, where `tensor` is made by one.

    In the training graph such a Reshape is a view (ORT aliases its buffer; profiled at
    0.01 ms for the 9.4 MB dW of a C=512 layer), but as an output of the cut graph bound to
    a user buffer it becomes a full copy (0.65 ms there) that training never pays.
    """
    while tensor.inputs and tensor.inputs[0].op == "Reshape":
        tensor = tensor.inputs[0].inputs[0]
    return tensor


# --------------------------------------------------------------------------------------
# Worker tasks
# --------------------------------------------------------------------------------------


def _session(model_bytes: bytes, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _bound_runner(session, feeds: dict) -> tuple[Callable[[], None], dict]:
    """Inputs and outputs bound to numpy buffers: a run does no allocation or copy of the results."""
    import numpy as np

    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    outputs = {}
    for out in session.get_outputs():
        array = np.empty(out.shape, np.float32)
        binding.bind_output(out.name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        outputs[out.name] = array

    def run() -> None:
        session.run_with_iobinding(binding)

    return run, outputs


def _time_model(model, feeds: dict, params: dict) -> dict[str, Any]:
    result = _time_serialized(model.SerializeToString(), feeds, params)
    result["ops"] = sorted({node.op_type for node in model.graph.node})
    return result


def _time_serialized(model_bytes: bytes, feeds: dict, params: dict) -> dict[str, Any]:
    """Time bound runs of the model; with `params["profile_runs"]`, then profile that many runs in a
    second session and add ORT's per-op-type kernel time (ms per run) as `op_ms`."""
    session = _session(model_bytes, params["threads"])
    run, outputs = _bound_runner(session, feeds)
    times = repeat_timed(
        run,
        warmup=params["warmup"],
        min_reps=params["min_reps"],
        min_time_s=params["min_time_s"],
        max_reps=params["max_reps"],
    )
    result = {
        "stats": timing_stats(times),
        "inputs": {name: list(array.shape) for name, array in feeds.items()},
        "outputs": {name: list(array.shape) for name, array in outputs.items()},
        "threads": params["threads"],
    }
    if params.get("profile_runs"):
        result["op_ms"] = _kernel_time_by_op(model_bytes, feeds, params)
    return result


def _kernel_time_by_op(model_bytes: bytes, feeds: dict, params: dict) -> dict[str, float]:
    """ORT's profiler: kernel time per op type, in ms per run (after one unprofiled warm-up run)."""
    import json
    import tempfile

    runs = params["profile_runs"]
    with tempfile.TemporaryDirectory(prefix="gf-layer-profile-") as folder:
        session = _session(model_bytes, params["threads"], profile_prefix=str(Path(folder) / "profile"))
        # Plain runs: ORT 1.19 aborts in its arena when a profiling session runs with IO binding.
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    kernel_runs: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3
        kernel_runs[event["name"]] = kernel_runs.get(event["name"], 0) + 1
    profiled = max(kernel_runs.values(), default=1)  # the warm-up run is profiled too
    return {op: ms / profiled for op, ms in sorted(totals.items(), key=lambda item: -item[1])}


def model_file_task(params: dict) -> dict[str, Any]:
    """Time an exported backward model (`params["model"]`, an .onnx file) on standard-normal inputs.

    Needs only numpy and onnxruntime, so it runs under any interpreter that has them (a plain
    onnxruntime venv, see benchmarks.layers_portable) and reads the inputs' shapes from the session.
    """
    import numpy as np
    import onnxruntime

    model_bytes = Path(params["model"]).read_bytes()
    session = _session(model_bytes, params["threads"])
    rng = np.random.default_rng(0)
    feeds = {value.name: rng.standard_normal(value.shape, dtype=np.float32) for value in session.get_inputs()}
    del session
    result = _time_serialized(model_bytes, feeds, params)
    result["onnxruntime"] = onnxruntime.__version__
    return result


def exact_task(params: dict) -> dict[str, Any]:
    import numpy as np

    layer = conv_layer(params["c"], params["h"], params["w"], params["batch"])
    rng = np.random.default_rng(0)
    c = params["c"]
    feeds = {
        "gy": rng.standard_normal(layer.y_shape, dtype=np.float32),
        "x": rng.standard_normal(layer.x_shape, dtype=np.float32),
        "w": rng.standard_normal((c, c, 3, 3), dtype=np.float32),
    }
    return _time_model(exact_backward_model(layer), feeds, params)


def filtered_task(params: dict) -> dict[str, Any]:
    import numpy as np

    from passes.geometry import filter_geometry

    layer = conv_layer(params["c"], params["h"], params["w"], params["batch"])
    geom = filter_geometry(layer, params["r"])
    rng = np.random.default_rng(0)
    c = params["c"]
    model = filtered_backward_model(layer, params["r"], params["upsample"])
    (pooled_input,) = [value.name for value in model.graph.input if value.name not in ("gy", "w")]  # x~
    feeds = {
        "gy": rng.standard_normal(layer.y_shape, dtype=np.float32),
        pooled_input: rng.standard_normal(geom.x_pooled_shape, dtype=np.float32),
        "w": rng.standard_normal((c, c, 3, 3), dtype=np.float32),
    }
    result = _time_model(model, feeds, params)
    result["grid"] = list(geom.grid)
    result["r"] = params["r"]
    result["x_pooled_shape"] = list(geom.x_pooled_shape)
    return result


def bandwidth_task(params: dict) -> dict[str, Any]:
    """Memory bandwidth of a large float32 copy, counted as bytes read + bytes written.

    One thread (np.copyto) and `threads` threads (each copying a slice; numpy drops the GIL
    for the copy); the floor uses the better of the two, as ORT may use either.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    count = params["mib"] * 1024 * 1024 // FLOAT_BYTES
    src = np.full(count, 1.5, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination pages in before timing
    threads = max(1, params["threads"])
    bounds = [count * i // threads for i in range(threads + 1)]
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(threads)]

    def copy_slice(part: slice) -> None:
        np.copyto(dst[part], src[part])

    results: dict[str, list[float]] = {"single_thread": [], "multi_thread": []}
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(params.get("reps", 5)):
            begin = time.perf_counter()
            np.copyto(dst, src)
            results["single_thread"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            list(pool.map(copy_slice, slices))
            results["multi_thread"].append(time.perf_counter() - begin)
    moved = 2 * src.nbytes
    out: dict[str, Any] = {"bytes_copied": src.nbytes, "threads": threads}
    # The compute side of the roofline: a large float32 GEMM (numpy's BLAS, `threads` threads).
    size = params.get("gemm_size", 2048)
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.ascontiguousarray(a.T)
    np.matmul(a, b)
    gemm_times = []
    for _ in range(params.get("reps", 5)):
        begin = time.perf_counter()
        np.matmul(a, b)
        gemm_times.append(time.perf_counter() - begin)
    out["gemm_gflops"] = 2 * size**3 / min(gemm_times) / 1e9
    for name, times in results.items():
        out[f"{name}_gbps"] = moved / min(times) / 1e9
        out[f"{name}_median_gbps"] = moved / statistics.median(times) / 1e9
    out["best_gbps"] = max(out["single_thread_gbps"], out["multi_thread_gbps"])
    return out


# --------------------------------------------------------------------------------------
# Suite (parent process)
# --------------------------------------------------------------------------------------


def aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The processes of one configuration: the reported time is the median of their medians."""
    medians = [run["stats"]["median_s"] for run in runs]
    median = statistics.median(medians)
    return {
        "median_s": median,
        # The fastest repetition: what the configuration costs when nothing else competes for the cores.
        "min_s": min(run["stats"]["min_s"] for run in runs),
        "run_medians_s": medians,
        "run_spread_rel": (max(medians) - min(medians)) / median if median else 0.0,
        "iqr_rel": max(run["stats"]["iqr_rel"] for run in runs),
        "runs": runs,
    }


def _measure_shape(ctx: SuiteContext, base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Exact and filtered variants of one shape, `ctx.repeat` rounds over all of them.

    Round-robin rather than one configuration's repeats back to back, so a burst of load from
    other processes lands on every variant of the shape instead of skewing one ratio.
    """
    configs = [("exact", "layer_exact", base)]
    for r in PATCH_SIZES:
        for upsample in (False, True):
            configs.append((variant_key(r, upsample), "layer_filtered", {**base, "r": r, "upsample": upsample}))
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in configs}
    for _ in range(ctx.repeat):
        for key, task, params in configs:
            runs[key].append(run_worker(task, params))
    exact = aggregate_runs(runs.pop("exact"))
    return exact, {key: aggregate_runs(key_runs) for key, key_runs in runs.items()}


def run(ctx: SuiteContext) -> SuiteResult:
    settings = SETTINGS[ctx.profile]
    timing = {
        "threads": ctx.threads,
        "warmup": settings.warmup,
        "min_reps": settings.min_reps,
        "min_time_s": settings.min_time_s,
        "max_reps": settings.max_reps,
    }
    bandwidth_params = {"mib": settings.bandwidth_mib, "threads": ctx.threads}
    blas_env = {"OPENBLAS_NUM_THREADS": str(ctx.threads), "OMP_NUM_THREADS": str(ctx.threads)}
    bandwidth = [run_worker("bandwidth", bandwidth_params, env=blas_env)]
    ctx.log(f"layers: memory bandwidth {bandwidth[0]['best_gbps']:.1f} GB/s (copy, read + write)")
    rows: list[dict[str, Any]] = []
    for c, h, w in settings.shapes:
        base = {"c": c, "h": h, "w": w, "batch": settings.batch, **timing}
        row: dict[str, Any] = {"c": c, "h": h, "w": w, "batch": settings.batch}
        row["exact"], row["filtered"] = _measure_shape(ctx, base)
        rows.append(row)
        ctx.log(
            f"layers: C={c} {h}x{w} exact {row['exact']['median_s'] * 1e3:.1f} ms, "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.2f} ms" for k, v in row["filtered"].items())
        )
    bandwidth.append(run_worker("bandwidth", bandwidth_params, env=blas_env))
    best_gbps = max(b["best_gbps"] for b in bandwidth)
    best_gemm = max(b["gemm_gflops"] for b in bandwidth)
    for row in rows:
        _derive(row, best_gbps, best_gemm)
    summary = _summary(rows)
    data = {
        "settings": asdict(settings),
        "threads": ctx.threads,
        "repeat": ctx.repeat,
        "bandwidth": {"runs": bandwidth, "best_gbps": best_gbps, "best_gemm_gflops": best_gemm},
        "rows": rows,
        "summary": summary,
        "paper_speedup_no_upsample": {str(r): s for r, s in PAPER_SPEEDUP.items()},
    }
    return SuiteResult(data=data, markdown=_markdown(data), plot=lambda path: _plot(data, path))


def _derive(row: dict[str, Any], gbps: float, gemm_gflops: float) -> None:
    """Speed-ups vs the exact ConvGrad, its GFLOP/s, and the floors of the upsampled variants.

    Memory floor: g_y read once + grad_x written once at `gbps`. Compute floor: the filtered
    backward's FLOPs (`passes.geometry.filtered_cost`, the paper's count) at the rate of a
    large GEMM. The roofline floor is the larger of the two.
    """
    from passes.geometry import filtered_cost

    n, c, h, w = row["batch"], row["c"], row["h"], row["w"]
    exact = row["exact"]["median_s"]
    macs = n * c * h * w * c * 9
    row["exact_gflops"] = 2 * 2 * macs / exact / 1e9  # dX and dW are one conv-sized GEMM each
    tensor_bytes = n * c * h * w * FLOAT_BYTES  # g_y and grad_x have the same shape here
    weight_bytes = c * c * 9 * FLOAT_BYTES
    row["gy_gx_bytes"] = 2 * tensor_bytes
    row["w_dw_bytes"] = 2 * weight_bytes
    row["floor_s"] = row["gy_gx_bytes"] / (gbps * 1e9)
    row["speedup"] = {}
    row["speedup_min"] = {}
    row["floor_fraction"] = {}
    row["io_floor_s"] = {}
    row["io_floor_fraction"] = {}
    row["filtered_flops"] = {}
    row["compute_floor_s"] = {}
    row["roofline_fraction"] = {}
    single = conv_layer(c, h, w, 1)
    for key, result in row["filtered"].items():
        row["speedup"][key] = exact / result["median_s"]
        row["speedup_min"][key] = row["exact"]["min_s"] / result["min_s"]
        if key.endswith("_up"):
            # 1.0 would be a backward that only streams g_y in and grad_x out once.
            row["floor_fraction"][key] = row["floor_s"] / result["median_s"]
            # Every input and output touched once: also x~, W and the 3x3 dW (W-sized, not small at C=512).
            pooled = result["runs"][0]["x_pooled_shape"]
            io_bytes = row["gy_gx_bytes"] + row["w_dw_bytes"] + FLOAT_BYTES * _prod(pooled)
            row["io_floor_s"][key] = io_bytes / (gbps * 1e9)
            row["io_floor_fraction"][key] = row["io_floor_s"][key] / result["median_s"]
            flops = n * filtered_cost(single, result["runs"][0]["r"], grad_x=True)["filtered_backward_flops"]
            row["filtered_flops"][key] = flops
            row["compute_floor_s"][key] = flops / (gemm_gflops * 1e9)
            roofline = max(row["floor_s"], row["compute_floor_s"][key])
            row["roofline_fraction"][key] = roofline / result["median_s"]


def _prod(values: list[int]) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [variant_key(r, up) for r in PATCH_SIZES for up in (False, True)]
    summary: dict[str, Any] = {
        "median_speedup": {key: statistics.median(row["speedup"][key] for row in rows) for key in keys},
        "median_speedup_from_min": {key: statistics.median(row["speedup_min"][key] for row in rows) for key in keys},
        "median_floor_fraction": {
            key: statistics.median(row["floor_fraction"][key] for row in rows) for key in keys if key.endswith("_up")
        },
        "median_roofline_fraction": {
            key: statistics.median(row["roofline_fraction"][key] for row in rows) for key in keys if key.endswith("_up")
        },
    }
    every = [row["exact"] for row in rows] + [v for row in rows for v in row["filtered"].values()]
    summary["max_iqr_rel"] = max(m["iqr_rel"] for m in every)
    summary["median_iqr_rel"] = statistics.median(m["iqr_rel"] for m in every)
    summary["max_run_spread_rel"] = max(m["run_spread_rel"] for m in every)
    return summary


def _markdown(data: dict[str, Any]) -> str:
    rows = data["rows"]
    batch = data["settings"]["batch"]
    headers = ["C", "H×W", "exact ms", "exact GFLOP/s"]
    for up in (False, True):
        for r in PATCH_SIZES:
            label = f"r={r}{' +up' if up else ''}"
            headers += [f"{label} ms", f"{label} ×"]
    table = []
    floors = []
    for row in rows:
        line = [
            row["c"],
            f"{row['h']}×{row['w']}",
            fmt(row["exact"]["median_s"] * 1e3, 1),
            fmt(row["exact_gflops"], 1),
        ]
        for up in (False, True):
            for r in PATCH_SIZES:
                key = variant_key(r, up)
                line += [fmt(row["filtered"][key]["median_s"] * 1e3, 2), fmt(row["speedup"][key], 1)]
        table.append(line)
        floor_line = [
            row["c"],
            f"{row['h']}×{row['w']}",
            fmt(row["gy_gx_bytes"] / 1e6, 1),
            fmt(row["floor_s"] * 1e3, 2),
        ]
        for r in PATCH_SIZES:
            key = variant_key(r, True)
            floor_line += [
                fmt(row["filtered"][key]["median_s"] * 1e3, 2),
                f"{row['floor_fraction'][key]:.0%}",
                f"{row['io_floor_fraction'][key]:.0%}",
                fmt(row["compute_floor_s"][key] * 1e3, 2),
                f"{row['roofline_fraction'][key]:.0%}",
            ]
        floors.append(floor_line)
    floor_headers = ["C", "H×W", "g_y + grad_x MB", "memory floor ms"]
    for r in PATCH_SIZES:
        floor_headers += [f"r={r} +up ms", "memory floor ÷ t", "all-IO floor ÷ t", "compute floor ms", "roofline ÷ t"]
    s = data["summary"]
    med = s["median_speedup"]
    lines = [
        f"3×3 stride-1 pad-1 conv, C_in = C_out = C, batch {batch}, fp32, ORT CPU with "
        f"intra_op_num_threads = {data['threads']}. Times are medians after warm-up (each configuration "
        f"in its own process, {data['repeat']} process(es) each); × = exact ConvGrad time ÷ filtered time. "
        "'+up' includes the nearest upsample of grad_x to full resolution; without it grad_x stays at "
        "patch resolution (the paper's per-layer measurement). The filtered graphs read dY, x~ and W.",
        "",
        md_table(headers, table, numeric_from=0),
        "",
        f"Median speed-up over the {len(rows)} shapes: "
        f"**r=2 {med['r2_noup']:.1f}×** (paper ≥ {PAPER_SPEEDUP[2]:.0f}×), "
        f"**r=4 {med['r4_noup']:.1f}×** (paper ≥ {PAPER_SPEEDUP[4]:.0f}×) without the upsample; "
        f"r=2 {med['r2_up']:.1f}×, r=4 {med['r4_up']:.1f}× with it. From the fastest repetition of each "
        "configuration instead of the median (less sensitive to other load on the machine): "
        + ", ".join(f"{key} {value:.1f}×" for key, value in s["median_speedup_from_min"].items())
        + ".",
        "",
        "Memory-bound floor of the '+up' variant: floor = (bytes of g_y read once + bytes of grad_x written "
        f"once) ÷ {data['bandwidth']['best_gbps']:.1f} GB/s, the best large numpy copy in this run (read + write "
        "counted; measured before and after the layers: "
        + ", ".join(f"{b['best_gbps']:.1f}" for b in data["bandwidth"]["runs"])
        + " GB/s). 'floor ÷ t' = how close the filtered backward gets to it (100% = at the floor); "
        "'all-IO floor' also counts reading x~ and W and writing the 3×3 dW once. Median floor ÷ t: "
        f"r=2 {s['median_floor_fraction']['r2_up']:.0%}, r=4 {s['median_floor_fraction']['r4_up']:.0%}. "
        "The compute floor is the filtered backward's FLOPs (the paper's count: mean-pool of g_y, grad_W and the "
        f"W~ channel mix at patch resolution) at {data['bandwidth']['best_gemm_gflops']:.0f} GFLOP/s, the best "
        "2048² float32 numpy GEMM in this run; roofline = the larger of the memory and compute floors (median "
        f"roofline ÷ t: r=2 {s['median_roofline_fraction']['r2_up']:.0%}, "
        f"r=4 {s['median_roofline_fraction']['r4_up']:.0%}).",
        "",
        md_table(floor_headers, floors, numeric_from=0),
        "",
        f"Noise: interquartile range ÷ median of the timed repetitions, median {s['median_iqr_rel']:.1%}, "
        f"worst {s['max_iqr_rel']:.1%}"
        + (f"; spread of per-process medians up to {s['max_run_spread_rel']:.1%}" if data["repeat"] > 1 else "")
        + ".",
    ]
    return "\n".join(lines)


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = data["rows"]
    labels = [f"{row['c']}\n{row['h']}×{row['w']}" for row in rows]
    keys = [variant_key(r, up) for up in (False, True) for r in PATCH_SIZES]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax1.bar(x + (i - 1.5) * width, [row["speedup"][key] for row in rows], width, label=key.replace("_", " "))
    for r, target in PAPER_SPEEDUP.items():
        ax1.axhline(target, linestyle="--", linewidth=0.8, color="gray")
        ax1.text(len(rows) - 0.5, target, f"paper r={r}", va="bottom", ha="right", fontsize=8, color="gray")
    ax1.set_yscale("log")
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set_ylabel("speed-up vs exact ConvGrad")
    ax1.set_title(f"filtered backward, batch {data['settings']['batch']}, {data['threads']} threads")
    ax1.legend(fontsize=8)
    for r, marker in zip(PATCH_SIZES, ("o", "s"), strict=True):
        ax2.plot(
            x, [row["filtered"][variant_key(r, True)]["median_s"] * 1e3 for row in rows], marker, label=f"r={r} +up"
        )
    ax2.plot(x, [row["floor_s"] * 1e3 for row in rows], "k_", markersize=18, label="memory floor")
    for r, marker in zip(PATCH_SIZES, ("1", "2"), strict=True):
        floors = [row["compute_floor_s"][variant_key(r, True)] * 1e3 for row in rows]
        ax2.plot(x, floors, marker, color="gray", markersize=10, label=f"compute floor r={r}")
    ax2.set_yscale("log")
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.set_ylabel("ms")
    ax2.set_title("with upsample vs the memory-bound floor")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
