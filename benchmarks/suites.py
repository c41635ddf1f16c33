"""The suite registry: name -> Suite. `python -m benchmarks all` runs them in this order."""

from __future__ import annotations

from . import analytic, layers, memory, step
from .common import Suite

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("analytic", "per-layer activation bytes and backward FLOPs, vanilla vs filtered", analytic.run),
        Suite("layers", "per-layer backward time in ORT, exact ConvGrad vs gradient filtering", layers.run),
        Suite("memory", "peak memory of one training step, compiled artifacts vs PyTorch", memory.run),
        Suite("step", "training step time, compiled artifacts vs PyTorch", step.run),
        # accuracy: reserved for the fine-tuning accuracy suite (added separately). Register it here
        # as Suite("accuracy", "...", accuracy.run); `all` and the CLI pick it up from this dict.
    )
}
