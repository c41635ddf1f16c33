"""Peak activation memory and step time of row tiling: untiled vs OverL vs 2PS at several K.

    .venv/bin/python benchmarks/row_tiling_bench.py                  # VGG-16-style and ResNet-18, 224x224, batch 8
    .venv/bin/python benchmarks/row_tiling_bench.py --models vgg16-all --ks 8 --json out.json

Models (`--models`): `vgg16` / `resnet18` train their last few convs and the head, and row
tiling splits the frozen prefix; `vgg16-all` / `resnet18-all` train every conv and also tile
the trainable layers (`plan.row_tile_trainable`, backward recomputed by `row_recompute`).

Every configuration is compiled here (the compiler's forward passes, `passes.row_tiling`,
ORT's gradient builder, the training passes plus `passes.row_recompute`; the untiled
baseline gets `row_recompute` too, which drops unread MaxPool indices, so the comparison
does not credit that fix to tiling). Then:

* memory: one fresh subprocess per configuration. Peak = the resident high-water mark over
  the training steps minus the resident size right after the session is created. The
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
}


def compile_artifacts(
    onnx_path: Path,
    out: Path,
    *,
    batch: int,
    train_layers: int,
    tiles: int,
    strategy: str,
    tile_trainable: bool = False,
) -> dict:
    """Compile like `gfcompile.pipeline.compile_model`, with row tiling as the last forward pass
    and row recompute as the last training pass."""
    import onnx_graphsurgeon as gs

    from gfcompile.backward import build_backward
    from gfcompile.config import CompileConfig
    from gfcompile.loading import load_and_validate, pin_shapes
    from gfcompile.output import save_model
    from gfcompile.passrunner import run_passes
    from gfcompile.pipeline import FORWARD_PASSES, TRAINING_PASSES
    from gfcompile.planning import select_layers
    from passes import row_recompute, row_tiling

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
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    if tiles:
        forward = run_passes((row_tiling,), forward, plan, stage="forward")
    estimate = row_tiling.estimate_peak_bytes(gs.import_onnx(forward), plan)
    train = build_backward(forward, plan, config, out)
    train.training = run_passes((*TRAINING_PASSES, row_recompute), train.training, plan, stage="training")
    save_model(train.training, out / "training_model.onnx")
    options = row_tiling.required_session_options(plan)
    if not tiles:
        options.update(enable_cpu_mem_arena=False, enable_mem_pattern=False)
    return {"estimate_mib": estimate / row_tiling.MIB, "session_options": options}


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
y = rng.integers(0, classes, size=batch).astype(np.int64)
"""

_MEMORY = r"""
module, state = load({art!r}, json.loads({options!r}), threads)
reset_peak()
loaded = status("VmRSS:")
for step in range(2):
    module(x, y)
    module.lazy_reset_grad()
print(json.dumps({{"peak_mib": status("VmHWM:") - loaded}}))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet18", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--strategies", default="overl,2ps")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up round")
    parser.add_argument("--train-layers", type=int, default=None, help="override the per-model trainable conv count")
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op threads (default 1: steadier timings on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from models import build
    from models.export import export_onnx

    results = []
    with tempfile.TemporaryDirectory(prefix="rowtile-bench-") as tmp:
        for name in args.models.split(","):
            zoo, kwargs, train_layers, tile_trainable = MODELS[name]
            train_layers = args.train_layers or train_layers
            model = build(zoo, **kwargs).eval()
            onnx_path = export_onnx(model, Path(tmp) / f"{zoo}.onnx", input_shape=(1, 3, args.size, args.size))
            configs = [(0, "none")] + [
                (int(k), strategy) for strategy in args.strategies.split(",") for k in args.ks.split(",")
            ]
            common = {"root": str(ROOT), "batch": args.batch, "size": args.size, "threads": args.threads}
            common["classes"] = kwargs["num_classes"]
            rows = []
            for tiles, strategy in configs:
                out = Path(tmp) / f"{name}-{strategy}-{tiles}"
                started = time.perf_counter()
                info = compile_artifacts(
                    onnx_path,
                    out,
                    batch=args.batch,
                    train_layers=train_layers,
                    tiles=tiles,
                    strategy=strategy if tiles else "overl",
                    tile_trainable=tile_trainable,
                )
                row = {"model": name, "strategy": strategy, "K": tiles, "compile_s": time.perf_counter() - started}
                row.update(info, artifacts=str(out))
                code = (_COMMON + _MEMORY).format(art=str(out), options=json.dumps(info["session_options"]), **common)
                row.update(_child(code, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")))
                rows.append(row)
            pairs = [(row["artifacts"], row["session_options"]) for row in rows]
            code = (_COMMON + _TIMING).format(configs=json.dumps(pairs), rounds=args.rounds, **common)
            for row, timing in zip(rows, _child(code), strict=True):
                row.update(timing)
            base = rows[0]
            for row in rows:
                row["memory_saving"] = 1 - row["peak_mib"] / base["peak_mib"]
                row["wall_overhead"] = row["wall_min_s"] / base["wall_min_s"] - 1
                row["cpu_overhead"] = row["cpu_min_s"] / base["cpu_min_s"] - 1
                print(
                    f"{name:12s} {row['strategy']:5s} K={row['K']:<2d} peak {row['peak_mib']:7.1f} MiB "
                    f"(est {row['estimate_mib']:6.1f})  saving {row['memory_saving'] * 100:5.1f}%  "
                    f"step {row['wall_min_s'] * 1000:6.0f} ms (median {row['wall_s'] * 1000:6.0f})  "
                    f"overhead {row['wall_overhead'] * 100:+5.1f}% wall, {row['cpu_overhead'] * 100:+5.1f}% cpu",
                    flush=True,
                )
                del row["artifacts"]
            results.extend(rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(
        f"batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s); step time: minimum over "
        f"{args.rounds} interleaved rounds after a warm-up; peak: resident high-water mark over the session's load"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
