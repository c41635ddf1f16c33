"""Measured peak memory of one ONNX Runtime run, for the tests that check a memory claim.

Peak = VmHWM after the run minus VmRSS before it, in a fresh process, with the high-water mark
reset after loading. Not ru_maxrss: across fork+exec the kernel keeps the parent's (pytest's)
resident size as the child's ru_maxrss, and clear_refs does not reset that. ORT's arena and
memory patterns are off and glibc returns large blocks to the kernel at once, so the resident
size follows what the graph really holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAN_MEASURE = Path("/proc/self/clear_refs").exists()
SKIP_REASON = "needs Linux /proc peak-RSS reset"


def forward_peak_bytes(model: Path, input_shape: tuple[int, ...]) -> int:
    """Peak of one inference run of `model` on a random float32 input."""
    return _measure({"kind": "forward", "path": str(model), "input_shape": list(input_shape), "mem_reuse": True})


def training_step_peak_bytes(
    artifacts: Path, input_shape: tuple[int, ...], labels: list[int], *, mem_reuse: bool = True
) -> int:
    """Peak of the second training step of compiled `artifacts` (the first allocates the gradient buffers)."""
    spec = {
        "kind": "training",
        "path": str(artifacts),
        "input_shape": list(input_shape),
        "labels": labels,
        "mem_reuse": mem_reuse,
    }
    return _measure(spec)


def _measure(spec: dict) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(
        [sys.executable, "-m", "tests.peak_memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key))


def _run_and_measure(spec: dict) -> int:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.enable_mem_reuse = spec["mem_reuse"]
    x = np.random.default_rng(0).standard_normal(spec["input_shape"]).astype(np.float32)
    if spec["kind"] == "forward":
        session = ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
        feeds = {session.get_inputs()[0].name: x}

        def run() -> None:
            session.run(None, feeds)
    else:
        from runtime.ort_training import training_api

        api = training_api()
        state = api.CheckpointState.load_checkpoint(os.path.join(spec["path"], "checkpoint"))
        module = api.Module(os.path.join(spec["path"], "training_model.onnx"), state, None, session_options=options)
        module.train()
        y = np.array(spec["labels"], dtype=np.int64)
        module(x, y)
        module.lazy_reset_grad()

        def run() -> None:
            module(x, y)

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident size
    base = _status_kib("VmRSS:")
    run()
    return 1024 * (_status_kib("VmHWM:") - base)


if __name__ == "__main__":
    print(_run_and_measure(json.loads(sys.argv[1])))
