"""The per-layer backward table on plain onnxruntime: what the portable train step runs.

    python -m benchmarks.layers_portable --portable-python PYTHON [--profile quick|full]
        [--repeat N] [--threads T] [--out DIR]

For the `layers` suite's conv shapes (benchmarks.layers: 3x3, stride 1, pad 1, C_in = C_out)
it exports, with the training build's tools, the backward graphs that each backend runs:
  - `convgrad`: com.microsoft ConvGrad(dY, X, W), timed under this interpreter (the training
    build) for reference;
  - `lowered`: the same ConvGrad after the portable step's lowering (gfcompile.pipeline's
    LOWER_PASSES: dX a ConvTranspose, dW from passes/lower_conv_grad.py, dB a ReduceSum);
  - `r2`, `r4` (and `+up`): the layers suite's gradient-filtered backward, lowered the same way.
Each is then timed in its own fresh worker process (benchmarks.layers.model_file_task, IO-bound
buffers, the layers suite's repetition settings); every lowered graph runs under
`--portable-python` (a venv with only numpy and the newest onnxruntime) and, for the exact one,
under this interpreter's ORT too, so a ratio separates the lowering from the ORT version. The
exact graphs also get one profiled run: ORT's kernel time per op type.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import layers
from .common import PROFILES, available_cores, fmt, machine_info, md_table, run_worker

CONVGRAD = "convgrad"
LOWERED = "lowered"
LOWERED_ON_TRAINING_BUILD = "lowered_training_ort"


def filtered_key(r: int, upsample: bool) -> str:
    return f"r{r}{'_up' if upsample else ''}"


FILTERED_KEYS = tuple(filtered_key(r, up) for up in (False, True) for r in layers.PATCH_SIZES)


def _lowered(model):
    """The model after the portable step's lower passes; only standard ONNX ops remain."""
    from gfcompile.passrunner import run_passes
    from gfcompile.pipeline import LOWER_PASSES
    from passes.base import Plan

    lowered = run_passes(LOWER_PASSES, model, Plan(convs=[]), stage="lower")
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in lowered.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"the lowered backward still has non-standard ops: {foreign}")
    return lowered


def export_shape(c: int, h: int, w: int, batch: int, folder: Path) -> dict[str, Path]:
    """The backward graphs of one shape as .onnx files: ConvGrad, its lowering, the lowered filtered ones."""
    import onnx

    layer = layers.conv_layer(c, h, w, batch)
    exact = layers.exact_backward_model(layer)
    models = {CONVGRAD: exact, LOWERED: _lowered(exact)}
    for r in layers.PATCH_SIZES:
        for upsample in (False, True):
            models[filtered_key(r, upsample)] = _lowered(layers.filtered_backward_model(layer, r, upsample))
    paths = {}
    for key, model in models.items():
        paths[key] = folder / f"{c}x{h}x{w}_{key}.onnx"
        onnx.save(model, paths[key])
    return paths


def _configs(paths: dict[str, Path], portable_python: str) -> list[tuple[str, str, str]]:
    """(key, model file, interpreter) of every timed configuration of a shape."""
    configs = [
        (CONVGRAD, str(paths[CONVGRAD]), sys.executable),
        (LOWERED, str(paths[LOWERED]), portable_python),
        (LOWERED_ON_TRAINING_BUILD, str(paths[LOWERED]), sys.executable),
    ]
    return configs + [(key, str(paths[key]), portable_python) for key in FILTERED_KEYS]


def measure(profile: str, threads: int, repeat: int, portable_python: str, log=print) -> dict[str, Any]:
    settings = layers.SETTINGS[profile]
    timing = {
        "threads": threads,
        "warmup": settings.warmup,
        "min_reps": settings.min_reps,
        "min_time_s": settings.min_time_s,
        "max_reps": settings.max_reps,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="gf-layers-portable-") as folder:
        for c, h, w in settings.shapes:
            paths = export_shape(c, h, w, settings.batch, Path(folder))
            configs = _configs(paths, portable_python)
            runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in configs}
            # Round-robin over the variants (as the layers suite): a burst of load hits all of them.
            for round_index in range(repeat):
                for key, model, python in configs:
                    params = {**timing, "model": model}
                    if round_index == 0 and key in (CONVGRAD, LOWERED):
                        params["profile_runs"] = 1
                    runs[key].append(run_worker("layer_model_file", params, python=python))
            row = {"c": c, "h": h, "w": w, "batch": settings.batch}
            row["results"] = {key: layers.aggregate_runs(key_runs) for key, key_runs in runs.items()}
            row["op_ms"] = {key: runs[key][0]["op_ms"] for key in (CONVGRAD, LOWERED)}
            row["onnxruntime"] = {key: runs[key][0]["onnxruntime"] for key in runs}
            rows.append(row)
            log(
                f"layers_portable: C={c} {h}x{w} "
                + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in row["results"].items())
            )
    return {
        "settings": {"profile": profile, "batch": settings.batch},
        "threads": threads,
        "repeat": repeat,
        "rows": rows,
    }


def _ratio(row: dict[str, Any], key: str, reference: str = CONVGRAD) -> float:
    return row["results"][key]["median_s"] / row["results"][reference]["median_s"]


def markdown(data: dict[str, Any]) -> str:
    rows = data["rows"]
    versions = rows[0]["onnxruntime"]
    headers = [
        "C",
        "H×W",
        f"ConvGrad ms (ORT {versions[CONVGRAD]})",
        f"lowered exact ms (ORT {versions[LOWERED]})",
        "÷ ConvGrad",
        f"lowered exact on ORT {versions[LOWERED_ON_TRAINING_BUILD]} ÷ ConvGrad",
    ]
    headers += [f"r={key[1]}{' +up' if key.endswith('_up') else ''} ms (×)" for key in FILTERED_KEYS]
    table = []
    for row in rows:
        results = row["results"]
        line = [
            row["c"],
            f"{row['h']}×{row['w']}",
            fmt(results[CONVGRAD]["median_s"] * 1e3, 1),
            fmt(results[LOWERED]["median_s"] * 1e3, 1),
            f"{_ratio(row, LOWERED):.2f}",
            f"{_ratio(row, LOWERED_ON_TRAINING_BUILD):.2f}",
        ]
        for key in FILTERED_KEYS:
            speedup = results[LOWERED]["median_s"] / results[key]["median_s"]
            line.append(f"{fmt(results[key]['median_s'] * 1e3, 1)} ({speedup:.1f}×)")
        table.append(line)
    profile_rows = []
    for row in rows:
        for key in (CONVGRAD, LOWERED):
            ops = row["op_ms"][key]
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:5])
            profile_rows.append([row["c"], f"{row['h']}×{row['w']}", key, f"{sum(ops.values()):.1f}", top])
    median = {key: statistics.median(_ratio(row, key) for row in rows) for key in (LOWERED, LOWERED_ON_TRAINING_BUILD)}
    speedups = {
        key: statistics.median(row["results"][LOWERED]["median_s"] / row["results"][key]["median_s"] for row in rows)
        for key in FILTERED_KEYS
    }
    lines = [
        f"3×3 stride-1 pad-1 conv, C_in = C_out = C, batch {data['settings']['batch']}, fp32, "
        f"intra_op_num_threads = {data['threads']}; medians after warm-up, each configuration in its own process "
        f"({data['repeat']} each). × = lowered exact ÷ filtered, both on ORT {versions[LOWERED]}.",
        "",
        md_table(headers, table, numeric_from=0),
        "",
        f"Median lowered exact ÷ ConvGrad: {median[LOWERED]:.2f} on ORT {versions[LOWERED]}, "
        f"{median[LOWERED_ON_TRAINING_BUILD]:.2f} on ORT {versions[LOWERED_ON_TRAINING_BUILD]}. Median speed-up of "
        "the filtered backward over the lowered exact one: "
        + ", ".join(f"{key} {value:.1f}×" for key, value in speedups.items())
        + ".",
        "",
        "ORT's profiler, one run: kernel ms per op type (the five largest).",
        "",
        md_table(["C", "H×W", "graph", "kernels ms", "by op type"], profile_rows, numeric_from=3, text_columns=(4,)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers_portable", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--portable-python",
        required=True,
        help="interpreter with plain onnxruntime and numpy (e.g. a throwaway venv with the newest onnxruntime)",
    )
    parser.add_argument("--profile", choices=PROFILES, default="quick", help="the layers suite's shapes and batch")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the usable cores)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per configuration")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    threads = args.threads or available_cores()
    machine = machine_info(threads)
    started = time.perf_counter()
    data = measure(args.profile, threads, args.repeat, args.portable_python, log=lambda m: print(m, file=sys.stderr))
    machine["loadavg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown(data)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(["python", "-m", "benchmarks.layers_portable", *(argv or sys.argv[1:])]),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine,
        "data": data,
    }
    (args.out / "layers_portable.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"# layers_portable ({args.profile})\n\n{machine['cpu_model']}, {threads} threads, load average "
        f"{machine['loadavg_1_5_15'][0]} at start and {machine['loadavg_1_5_15_end'][0]} at end.\n\n"
    )
    (args.out / "layers_portable.md").write_text(header + text + "\n")
    print(header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
