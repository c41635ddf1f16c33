"""The suite registry: name -> Suite. `python -m benchmarks all` runs them in this order."""

from __future__ import annotations

from . import accuracy, analytic, convergence, feature_cache, federated, layers, memory, step
from .common import Suite

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("analytic", "per-layer activation bytes and backward FLOPs, vanilla vs filtered", analytic.run),
        Suite("layers", "per-layer backward time in ORT, exact ConvGrad vs gradient filtering", layers.run),
        Suite("memory", "peak memory of one training step, compiled artifacts vs PyTorch", memory.run),
        Suite("step", "training step time, compiled artifacts vs PyTorch", step.run),
        Suite(
            "accuracy",
            "fine-tuning accuracy on digits 5-9: exact BP vs gradient filtering vs row tiling",
            accuracy.run,
        ),
        Suite("convergence", "time to accuracy on digits 5-9: exact BP vs gradient filtering", convergence.run),
        federated.SUITE,
        Suite(
            "feature_cache",
            "epoch time and peak memory with the frozen-prefix feature cache vs without, and the cache build time",
            feature_cache.run,
        ),
    )
}
