"""Peak activation memory and step time of row tiling: untiled vs OverL vs 2PS at several K.

    .venv/bin/python benchmarks/row_tiling_bench.py                  # VGG-16-style and ResNet-18, 224x224, batch 8
    .venv/bin/python benchmarks/row_tiling_bench.py --models vgg16-all --ks 8 --json out.json

Models (`--models`): `vgg16` / `resnet18` train their last few convs and the head, and row
tiling splits the frozen prefix; `vgg16-all` / `resnet18-all` train every conv and also tile
the trainable layers (`plan.row_tile_trainable`, backward recomputed by `row_recompute`).

Every configuration is compiled here (the compiler's forward passes, `passes.row_tiling`,
ORT's gradient builder, the training passes, which end with `passes.row_recompute`; the
untiled baseline runs it too, which drops unread MaxPool indices, so the comparison does not
credit that fix to tiling). Then:

* memory: one fresh subprocess per configuration. Peak = the resident high-water mark over
  two training steps minus the resident size right after the session is created (so it
  includes the weight-gradient buffers ORT allocates in the first step); step peak = the
  high-water mark of the second step minus the resident size before it (activations and
  kernel scratch only: what `row_tiling.estimate_peak_bytes` estimates). The
  high-water mark is reset after loading (/proc/self/clear_refs) so that a transient spike
  while ORT loads the model cannot hide a smaller step peak, and it is read from VmHWM, not
  `resource.getrusage`: across fork+exec the kernel reports the parent's resident size as
  the child's ru_maxrss, and clear_refs does not reset that. glibc's mmap threshold is
  pinned (MALLOC_MMAP_THRESHOLD_) so freed buffers leave the process and the high-water
  mark follows live memory.
* time: one subprocess loads every configuration of a model and runs their training steps
  (forward + backward, no optimizer step) interleaved, round after round, so a busy
  neighbour on a shared machine slows all of them alike; wall and process CPU time per
  step, minimum and median over the rounds after a warm-up round.

Session options: `row_tiling.required_session_options(plan)` of each configuration (DEFAULT
order, ORT_ENABLE_ALL; with tiling the CPU arena, memory pattern and buffer reuse are off),
except that the baseline's arena and memory pattern are off too: they only add to its
measured peak. The estimate of the pass (`row_tiling.estimate_peak_bytes`) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    # name -> (zoo name, factory kwargs, trainable convs, tile trainable layers too)
    "vgg16": ("vgg16_bn", {"num_classes": 10, "classifier_width": 256}, 3, False),
    "vgg16-all": ("vgg16_bn", {"num_classes": 10, "classifier_width": 256}, 13, True),
    "resnet18": ("resnet18", {"num_classes": 10}, 4, False),
    "resnet18-all": ("resnet18", {"num_classes": 10}, 20, True),
    # DeepLabV3-ResNet-18 (output stride 8): the head's last 3 convs train (classifier.4,
    # classifier.1 and the ASPP projection); the frozen backbone is tiled. Per-pixel labels.
    "deeplab": ("deeplabv3_resnet18", {"num_classes": 21}, 3, False),
}
SEGMENTATION = {"deeplab"}


def compile_artifacts(
    onnx_path: Path,
    out: Path,
    *,
    batch: int,
    train_layers: int,
    tiles: int,
    strategy: str,
    tile_trainable: bool = False,
    band_rows: int = 0,
) -> dict:
    """Compile like `gfcompile.pipeline.compile_model` (its forward and training passes), into `out`.

    `band_rows` > 0 overrides `tiles`: K = input height // band_rows, at least 2 and at most
    what the first tileable chain allows (`row_tiling.max_row_tiles`), so bands keep about
    the same height at every resolution.
    """
    import onnx_graphsurgeon as gs

    from gfcompile.backward import build_backward
    from gfcompile.config import CompileConfig
    from gfcompile.loading import load_and_validate, pin_shapes
    from gfcompile.output import save_model
    from gfcompile.passrunner import passes_before, run_passes
    from gfcompile.pipeline import FORWARD_PASSES, TRAINING_PASSES
    from gfcompile.planning import select_layers
    from passes import row_tiling

    config = CompileConfig(
        train_layers=train_layers,
        batch_size=batch,
        row_tiles=tiles,
        row_strategy=strategy,  # type: ignore[arg-type]
        optimizer="sgd",
        momentum=0.0,
        output_dir=out,
    )
    model = pin_shapes(load_and_validate(onnx_path), config)
    plan = select_layers(model, config)
    plan.row_tile_trainable = tile_trainable  # type: ignore[attr-defined]
    forward = run_passes(passes_before(FORWARD_PASSES, row_tiling), model, plan, stage="forward")
    if band_rows:
        height = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        limit = row_tiling.max_row_tiles(gs.import_onnx(forward), plan)
        plan.row_tiles = tiles = max(2, min(height // band_rows, limit))
    forward = run_passes((row_tiling,), forward, plan, stage="forward")
    estimate = row_tiling.estimate_peak_bytes(gs.import_onnx(forward), plan)
    train = build_backward(forward, plan, config, out)
    train.training = run_passes(TRAINING_PASSES, train.training, plan, stage="training")
    save_model(train.training, out / "training_model.onnx")
    options = row_tiling.required_session_options(plan)
    if not tiles:
        options.update(enable_cpu_mem_arena=False, enable_mem_pattern=False)
    return {"estimate_mib": estimate / row_tiling.MIB, "session_options": options, "K": tiles}


_COMMON = r"""
import json, os, statistics, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import onnxruntime as ort
from runtime.ort_training import training_api

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key)) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

def load(art, spec, threads):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["graph_optimization_level"])
    options.execution_order = getattr(ort.ExecutionOrder, spec["execution_order"])
    options.enable_cpu_mem_arena = spec["enable_cpu_mem_arena"]
    options.enable_mem_pattern = spec.get("enable_mem_pattern", True)
    options.enable_mem_reuse = spec.get("enable_mem_reuse", True)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    state = training_api().CheckpointState.load_checkpoint(os.path.join(art, "checkpoint"))
    module = training_api().Module(os.path.join(art, "training_model.onnx"), state, None, session_options=options)
    module.train()
    return module, state

batch, size, classes, threads = {batch}, {size}, {classes}, {threads}
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
y = rng.integers(0, classes, size=(batch, size, size) if {segmentation} else batch).astype(np.int64)
"""

_MEMORY = r"""
module, state = load({art!r}, json.loads({options!r}), threads)
reset_peak()
loaded = status("VmRSS:")
start = time.perf_counter()
module(x, y)
seconds = time.perf_counter() - start
module.lazy_reset_grad()
result = {{"peak_mib": status("VmHWM:") - loaded, "first_step_s": seconds}}
if {steps} > 1:
    reset_peak()
    settled = status("VmRSS:")
    module(x, y)
    module.lazy_reset_grad()
    result["peak_mib"] = max(result["peak_mib"], status("VmHWM:") - loaded)
    result["step_peak_mib"] = status("VmHWM:") - settled
print(json.dumps(result))
"""

_TIMING = r"""
configs = json.loads({configs!r})
modules = [load(art, spec, threads) for art, spec in configs]
wall = [[] for _ in configs]
cpu = [[] for _ in configs]
for round in range({rounds} + 1):
    for index, (module, _) in enumerate(modules):
        start, start_cpu = time.perf_counter(), time.process_time()
        module(x, y)
        if round:
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(time.process_time() - start_cpu)
        module.lazy_reset_grad()
print(json.dumps([{{"wall_min_s": min(w), "wall_s": statistics.median(w), "cpu_min_s": min(c),
                   "cpu_s": statistics.median(c)}} for w, c in zip(wall, cpu)]))
"""


def _child(code: str, env: dict | None = None):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _configs(ks: str, strategies: str) -> list[tuple[int, str, int]]:
    """(K, strategy, band rows) per configuration, the untiled baseline first; `rN` in `ks` means
    K = height // N (see compile_artifacts)."""
    configs = [(0, "none", 0)]
    for strategy in strategies.split(","):
        for k in ks.split(","):
            rows = int(k[1:]) if k.startswith("r") else 0
            configs.append((0 if rows else int(k), strategy, rows))
    return configs


def _label(tiles: int, strategy: str, rows: int) -> str:
    return "untiled" if strategy == "none" else f"{strategy} K={'h/' + str(rows) if rows else tiles}"


def _export(name: str, size: int, directory: Path) -> Path:
    from models import build
    from models.export import export_onnx

    zoo, kwargs, _, _ = MODELS[name]
    path = directory / f"{zoo}-{size}.onnx"
    if not path.exists():
        model = build(zoo, **kwargs).eval()
        if zoo == "vgg16_bn" and size % 224:
            # VGG's 7x7 adaptive pool exports only when size/32 is a multiple of 7: at other
            # sizes the head pools globally (512 features into the first linear).
            from torch import nn

            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier[0] = nn.Linear(512, model.classifier[0].out_features)
        export_onnx(model, path, input_shape=(1, 3, size, size))
    return path


def _common(args: argparse.Namespace, name: str, size: int) -> dict:
    return {
        "root": str(ROOT),
        "batch": args.batch,
        "size": size,
        "threads": args.threads,
        "classes": MODELS[name][1]["num_classes"],
        "segmentation": name in SEGMENTATION,
    }


def _measure(args: argparse.Namespace, name: str, size: int, config: tuple[int, str, int], tmp: Path, steps: int):
    """Compile one configuration at `size` and measure its peak in a fresh process."""
    tiles, strategy, rows = config
    _, _, train_layers, tile_trainable = MODELS[name]
    out = tmp / f"{name}-{size}-{strategy}-{tiles}-{rows}"
    started = time.perf_counter()
    info = compile_artifacts(
        _export(name, size, tmp),
        out,
        batch=args.batch,
        train_layers=args.train_layers or train_layers,
        tiles=tiles,
        strategy=strategy if strategy != "none" else "overl",
        tile_trainable=tile_trainable,
        band_rows=rows,
    )
    row = {"model": name, "size": size, "strategy": strategy, "band_rows": rows}
    row.update(info, compile_s=time.perf_counter() - started, artifacts=str(out))
    options = json.dumps(info["session_options"])
    code = (_COMMON + _MEMORY).format(art=str(out), options=options, steps=steps, **_common(args, name, size))
    row.update(_child(code, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")))
    return row


def table(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Peak memory and step time of every configuration at one size."""
    results = []
    for name in args.models.split(","):
        rows = [_measure(args, name, args.size, config, tmp, steps=2) for config in _configs(args.ks, args.strategies)]
        pairs = [(row["artifacts"], row["session_options"]) for row in rows]
        code = (_COMMON + _TIMING).format(
            configs=json.dumps(pairs), rounds=args.rounds, **_common(args, name, args.size)
        )
        for row, timing in zip(rows, _child(code), strict=True):
            row.update(timing)
        base = rows[0]
        for row in rows:
            row["memory_saving"] = 1 - row["peak_mib"] / base["peak_mib"]
            row["step_memory_saving"] = 1 - row["step_peak_mib"] / base["step_peak_mib"]
            row["wall_overhead"] = row["wall_min_s"] / base["wall_min_s"] - 1
            row["cpu_overhead"] = row["cpu_min_s"] / base["cpu_min_s"] - 1
            print(
                f"{name:12s} {row['strategy']:5s} K={row['K']:<2d} peak {row['peak_mib']:7.1f} MiB "
                f"(saving {row['memory_saving'] * 100:5.1f}%)  step peak {row['step_peak_mib']:7.1f} MiB "
                f"(saving {row['step_memory_saving'] * 100:5.1f}%, est {row['estimate_mib']:6.1f})  "
                f"step {row['wall_min_s'] * 1000:6.0f} ms (median {row['wall_s'] * 1000:6.0f})  "
                f"overhead {row['wall_overhead'] * 100:+5.1f}% wall, {row['cpu_overhead'] * 100:+5.1f}% cpu",
                flush=True,
            )
            del row["artifacts"]
        results.extend(rows)
    print(
        f"batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s); step time: minimum over "
        f"{args.rounds} interleaved rounds after a warm-up; peak: resident high-water mark over two steps "
        "above the loaded session; step peak: over the second step above the resident size before it"
    )
    return results


def max_resolution(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The largest input size (a multiple of `--size-step`) whose peak fits `--max-resolution` MiB.

    Per configuration: from `--size`, double (or halve) until the peak crosses the budget, then
    narrow the bracket, guessing by interpolating the peak linearly in size^2 (activations grow
    with the pixel count). Each probe compiles at that size and measures one training step in
    a fresh process (peak as in `table`, so weight-gradient buffers count).
    """
    budget, step = args.max_resolution, args.size_step
    results = []
    for name in args.models.split(","):
        for config in _configs(args.ks, args.strategies):
            probes: dict[int, dict] = {}

            def probe(size: int, config=config, probes=probes, name=name) -> bool:
                row = _measure(args, name, size, config, tmp, steps=1)
                shutil.rmtree(row.pop("artifacts"), ignore_errors=True)
                probes[size] = row
                fits = row["peak_mib"] <= budget
                print(
                    f"  {name} {_label(*config)} at {size}: K={row['K']} peak {row['peak_mib']:.0f} MiB "
                    f"({'fits' if fits else 'over'}), step {row['first_step_s']:.1f} s",
                    flush=True,
                )
                return fits

            low, high = 0, 0  # the largest size known to fit, the smallest known not to
            size = args.size
            while not (low and high):
                if probe(size):
                    low = size
                    if size * 2 > args.max_size:
                        high = args.max_size + step
                        break
                    size *= 2
                else:
                    high = size
                    if size // 2 < step:
                        break
                    size = max(step, (size // 2) // step * step)
            while low and high - low > step:
                p_low, p_high = probes[low]["peak_mib"], probes.get(high, {}).get("peak_mib")
                guess = (low + high) // 2
                if p_high is not None and p_high > p_low:
                    area = low**2 + (budget - p_low) * (high**2 - low**2) / (p_high - p_low)
                    guess = int(area**0.5)
                guess = min(max(guess // step * step, low + step), high - step)
                if probe(guess):
                    low = guess
                else:
                    high = guess
            best = probes.get(low, {})
            row = {
                "model": name,
                "config": _label(*config),
                "budget_mib": budget,
                "batch": args.batch,
                "max_size": low,
                "K": best.get("K"),
                "peak_mib": best.get("peak_mib"),
                "first_step_s": best.get("first_step_s"),
                "probes": {size: probes[size]["peak_mib"] for size in sorted(probes)},
            }
            results.append(row)
            print(
                f"{name:10s} {row['config']:14s} largest size {low} (K={row['K']}, peak {row['peak_mib']})", flush=True
            )
    base = {row["model"]: row["max_size"] for row in results if row["config"] == "untiled"}
    for row in results:
        if base.get(row["model"]):
            row["size_ratio"] = row["max_size"] / base[row["model"]]
            print(
                f"{row['model']:10s} {row['config']:14s} {row['max_size']:5d} px  {row['size_ratio']:.2f}x the side, "
                f"{row['size_ratio'] ** 2:.1f}x the pixels of untiled"
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet18", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--size", type=int, default=224, help="input height and width (max-resolution: first probe)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ks", default="2,4,8", help="band counts; rN: K = height // N at every size")
    parser.add_argument("--strategies", default="overl,2ps")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up round")
    parser.add_argument("--train-layers", type=int, default=None, help="override the per-model trainable conv count")
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (default 1: steadier timings on a shared machine)"
    )
    parser.add_argument(
        "--max-resolution",
        type=float,
        default=None,
        metavar="MIB",
        help="instead of the table: the largest input size per configuration whose peak fits MIB",
    )
    parser.add_argument("--size-step", type=int, default=32, help="max-resolution: sizes are multiples of this")
    parser.add_argument("--max-size", type=int, default=2048, help="max-resolution: largest size probed")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(sorted(MODELS))}")

    # onnx-graphsurgeon's toposort recurses once per level of the graph, and a training graph
    # with many bands (recompute copies chained band after band) is thousands of levels deep.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 200_000))
    with tempfile.TemporaryDirectory(prefix="rowtile-bench-") as tmp:
        run = table if args.max_resolution is None else max_resolution
        results = run(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
