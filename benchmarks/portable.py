"""Step time and peak memory of the portable train step vs the training build, in the same run.

    python -m benchmarks.portable [--models mobilenet_v2 resnet18] [--size 224] [--batches 8 32]
        [--steps 5] [--portable-python PYTHON] [-o bench_results/portable.json]

Each configuration is compiled once (the last 4 convs trained, `--filter-layers` of them
gradient-filtered with r=2, AdamW); then each backend
trains it in its own fresh process (`--measure`), so peak RSS (ru_maxrss) is that backend's alone:
the training build (`runtime.trainer.Trainer` on onnxruntime-training) and the portable step
(`runtime.portable.PortableTrainer` on plain onnxruntime). Memory is VmHWM: the whole process's
peak, and the peak over the timed steps alone (after a reset following the warm-up step). `--portable-python` runs the portable
side under another interpreter, e.g. a venv with the newest onnxruntime (it needs only numpy and
onnxruntime; the repository is put on its path). The step time is the median over `--steps` steps
after one warm-up step.
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

ROOT = Path(__file__).resolve().parents[1]


def measure(backend: str, artifacts: Path, steps: int) -> dict:
    """Runs in the measuring process: train `steps` + 1 steps on random data, report time and peak RSS."""
    import numpy as np
    import onnxruntime

    from runtime.portable import PortableTrainer
    from runtime.trainer import Trainer

    trainer = PortableTrainer(artifacts) if backend == "portable" else Trainer(artifacts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(trainer.spec.inputs[0].shape).astype(np.float32)
    classes = trainer.spec.outputs[0].shape[1]
    y = rng.integers(0, classes, size=trainer.spec.labels[0].shape).astype(np.int64)
    trainer.train_step(x, y)
    loaded_peak = _high_water_mib()
    _reset_high_water()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(x, y)
        times.append(time.perf_counter() - start)
    return {
        "backend": type(trainer).__name__,
        "onnxruntime": onnxruntime.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
        "step_ms": float(np.median(times) * 1e3),
        "peak_rss_mib": max(loaded_peak, _high_water_mib()),
        "step_peak_rss_mib": _high_water_mib(),
        "loadavg": os.getloadavg()[0],
    }


def _high_water_mib() -> float:
    """VmHWM, the peak RSS of this process's address space. Not ru_maxrss: Linux carries that over
    exec from the parent, so a child of the (large) compiling process would report the parent's."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_high_water() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the step peak excludes loading."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _run_measure(python: str, backend: str, artifacts: Path, steps: int) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.portable import measure; "
        f"print(json.dumps(measure({backend!r}, __import__('pathlib').Path({str(artifacts)!r}), {steps})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    result = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks.portable: error: {backend} run failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compile(name: str, size: int, batch: int, filter_layers: int, directory: Path) -> Path:
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from models import build
    from models.export import export_onnx

    model = build(name, num_classes=10).eval()
    path = export_onnx(model, directory / f"{name}.onnx", input_shape=(1, 3, size, size))
    config = CompileConfig(
        filter_layers=filter_layers, train_layers=4, batch_size=batch, output_dir=directory / "artifacts"
    )
    return compile_model(path, config, report=lambda message: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.portable", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--filter-layers", type=int, default=0, help="gradient-filter this many of the 4 trained convs")
    parser.add_argument("--portable-python", default=sys.executable, help="interpreter for the portable backend")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_results/portable.json"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for batch in args.batches:
            with tempfile.TemporaryDirectory(prefix="gf-portable-bench-") as folder:
                artifacts = _compile(name, args.size, batch, args.filter_layers, Path(folder))
                training = _run_measure(sys.executable, "training", artifacts, args.steps)
                portable = _run_measure(args.portable_python, "portable", artifacts, args.steps)
            row = {
                "model": name,
                "size": args.size,
                "batch": batch,
                "filter_layers": args.filter_layers,
                "training_build": training,
                "portable": portable,
                "time_ratio": portable["step_ms"] / training["step_ms"],
                "memory_ratio": portable["peak_rss_mib"] / training["peak_rss_mib"],
            }
            rows.append(row)
            print(
                f"{name} {args.size}² batch {batch} filter {args.filter_layers}: training build {training['step_ms']:.0f} ms "
                f"{training['peak_rss_mib']:.0f} MiB (steps {training['step_peak_rss_mib']:.0f}, ORT "
                f"{training['onnxruntime']}), portable {portable['step_ms']:.0f} ms {portable['peak_rss_mib']:.0f} "
                f"MiB (steps {portable['step_peak_rss_mib']:.0f}, ORT {portable['onnxruntime']}, Python "
                f"{portable['python']}): time x{row['time_ratio']:.2f}, memory x{row['memory_ratio']:.2f}",
                flush=True,
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
