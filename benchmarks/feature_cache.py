"""Epoch time and peak memory with and without the frozen-prefix feature cache.

    python -m benchmarks feature_cache [--profile quick|full]
    python -m benchmarks.feature_cache [--models mobilenet_v2 resnet18 mcunet] [--size 224]
        [--batches 8 32] [--samples 64] [--cache-memory-mb 1024] [-o bench_results/feature_cache.json]

Each configuration is compiled once with `--feature-cache` (the last 4 convs trained, AdamW,
`--filter-layers` of them gradient-filtered with r=2).
Then each side trains one epoch (samples // batch steps, the same data order) in its own fresh
process, so peak memory (VmHWM, the process's high-water RSS) is that side's alone:

- uncached: runtime.trainer.Trainer on the whole-graph models, one warm-up step, then one epoch;
- cached: runtime.feature_cache.CachedTrainer; building the cache (the prefix over every sample)
  is timed on its own, then one warm-up step and one epoch of the tail.

The data are random samples of the model's input shape, held in memory by both sides.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import SuiteContext, SuiteResult

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    "quick": {"models": ("mobilenet_v2",), "size": 224, "batches": (8,), "samples": 32, "filter_layers": (0, 4)},
    "full": {
        "models": ("mobilenet_v2", "resnet18", "mcunet"),
        "size": 224,
        "batches": (8, 32),
        "samples": 256,
        "filter_layers": (0, 4),
    },
}


def measure(cached: bool, artifacts: Path, samples: int, cache_dir: Path, memory_mb: float) -> dict[str, Any]:
    """Runs in the measuring process: one epoch of `samples` random samples; times and VmHWM."""
    import numpy as np

    from runtime.data import Dataset
    from runtime.feature_cache import CachedTrainer, CacheSettings
    from runtime.trainer import Trainer

    if cached:
        trainer = CachedTrainer(artifacts, settings=CacheSettings(cache_dir, memory_mb), out=io.StringIO())
    else:
        trainer = Trainer(artifacts)
    rng = np.random.default_rng(0)
    spec = trainer.spec
    x = rng.standard_normal((samples, *spec.inputs[0].shape[1:])).astype(np.float32)
    y = rng.integers(0, spec.outputs[0].shape[1], size=samples).astype(np.int64)
    data = Dataset(x=x, y=y)
    build_s = None
    if cached:
        start = time.perf_counter()
        trainer.features(data)  # builds the cache; fit reuses the opened store
        build_s = time.perf_counter() - start
    steps = samples // trainer.batch_size
    trainer.fit(data, 1, log_every=0)  # warm-up: session and arena allocations
    start = time.perf_counter()
    trainer.fit(data, steps, log_every=0)
    epoch_s = time.perf_counter() - start
    return {
        "epoch_s": epoch_s,
        "steps": steps,
        "cache_build_s": build_s,
        "peak_rss_mib": _high_water_mib(),
        "loadavg": os.getloadavg()[0],
    }


def _high_water_mib() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _run_measure(cached: bool, artifacts: Path, samples: int, cache_dir: Path, memory_mb: float) -> dict[str, Any]:
    code = (
        f"import sys, json, pathlib; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.feature_cache import measure; "
        f"print(json.dumps(measure({cached!r}, pathlib.Path({str(artifacts)!r}), {samples}, "
        f"pathlib.Path({str(cache_dir)!r}), {memory_mb!r})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks.feature_cache: error: measuring run failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compile(name: str, size: int, batch: int, filter_layers: int, directory: Path) -> Path:
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from models import build
    from models.export import export_onnx

    model = build(name, num_classes=10).eval()
    path = export_onnx(model, directory / f"{name}.onnx", input_shape=(1, 3, size, size))
    config = CompileConfig(
        filter_layers=filter_layers,
        train_layers=4,
        batch_size=batch,
        output_dir=directory / "artifacts",
        feature_cache=True,
    )
    return compile_model(path, config, report=lambda message: None)


def measure_all(
    models: tuple[str, ...],
    size: int,
    batches: tuple[int, ...],
    samples: int,
    memory_mb: float,
    filter_layers: int = 0,
    log=print,
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        for batch in batches:
            with tempfile.TemporaryDirectory(prefix="gf-feature-cache-bench-") as folder:
                started = time.perf_counter()
                artifacts = _compile(name, size, batch, filter_layers, Path(folder))
                compile_s = time.perf_counter() - started
                uncached = _run_measure(False, artifacts, samples, Path(folder) / "cache", memory_mb)
                cached = _run_measure(True, artifacts, samples, Path(folder) / "cache", memory_mb)
            row = {
                "model": name,
                "size": size,
                "batch": batch,
                "samples": samples,
                "filter_layers": filter_layers,
                "cache_memory_mb": memory_mb,
                "compile_s": compile_s,
                "uncached": uncached,
                "cached": cached,
                "epoch_speedup": uncached["epoch_s"] / cached["epoch_s"],
            }
            rows.append(row)
            log(_line(row))
    return rows


def _line(row: dict[str, Any]) -> str:
    uncached, cached = row["uncached"], row["cached"]
    return (
        f"{row['model']} {row['size']}² batch {row['batch']}, {row['filter_layers']} of 4 filtered, "
        f"{row['samples']} samples: epoch uncached "
        f"{uncached['epoch_s']:.2f} s, cached {cached['epoch_s']:.2f} s (x{row['epoch_speedup']:.1f}); cache build "
        f"{cached['cache_build_s']:.2f} s; peak {uncached['peak_rss_mib']:.0f} vs {cached['peak_rss_mib']:.0f} MiB; "
        f"load average {uncached['loadavg']:.1f}/{cached['loadavg']:.1f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | filtered | samples | epoch uncached (s) | epoch cached (s) | speedup | cache build (s) | "
        "peak uncached (MiB) | peak cached (MiB) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        uncached, cached = row["uncached"], row["cached"]
        lines.append(
            f"| {row['model']} {row['size']}² | {row['batch']} | {row['filter_layers']} of 4 | {row['samples']} | "
            f"{uncached['epoch_s']:.2f} | "
            f"{cached['epoch_s']:.2f} | x{row['epoch_speedup']:.1f} | {cached['cache_build_s']:.2f} | "
            f"{uncached['peak_rss_mib']:.0f} | {cached['peak_rss_mib']:.0f} | "
            f"{uncached['loadavg']:.1f}/{cached['loadavg']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(ctx: SuiteContext) -> SuiteResult:
    settings = PROFILES[ctx.profile]
    models = tuple(name for name in settings["models"] if not ctx.models or name in ctx.models)
    rows = [
        row
        for filter_layers in settings["filter_layers"]
        for row in measure_all(
            models, settings["size"], settings["batches"], settings["samples"], 1024.0, filter_layers, log=ctx.log
        )
    ]
    return SuiteResult(data={"rows": rows}, markdown=markdown(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PROFILES["full"]["models"]))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--samples", type=int, default=256, help="samples per epoch")
    parser.add_argument("--cache-memory-mb", type=float, default=1024.0)
    parser.add_argument("--filter-layers", type=int, default=0, help="gradient-filter this many of the 4 trained convs")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_results/feature_cache.json"))
    args = parser.parse_args(argv)
    rows = measure_all(
        tuple(args.models), args.size, tuple(args.batches), args.samples, args.cache_memory_mb, args.filter_layers
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
