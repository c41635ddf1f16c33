"""The training-run options of `gftrain` and `gfcompile train`, declared once and validated where declared.

A value out of range is refused while the command line is parsed, as the one-line error every
entry point prints (`gfcompile: error: --seed must be >= 0, got -1`), before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from .errors import RunError


def bounded_int(option: str, minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, or a RunError naming `option`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise RunError(f"{option} must be an integer, got {text!r}") from None
        if value < minimum:
            raise RunError(f"{option} must be >= {minimum}, got {value}")
        return value

    return parse


def positive_float(option: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0, or a RunError naming `option`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise RunError(f"{option} must be a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise RunError(f"{option} must be a positive number, got {value}")
        return value

    return parse


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--steps, --seed, --log-every, --checkpoint-every, --export and --skip-nonfinite."""
    parser.add_argument(
        "--steps",
        type=bounded_int("--steps", 1),
        default=50,
        help="train this many steps from the start of the run; rerunning a run that stopped early resumes it "
        "and ends at the same step",
    )
    parser.add_argument("--seed", type=bounded_int("--seed", 0), default=0, help="data order (with the step)")
    parser.add_argument("--log-every", type=bounded_int("--log-every", 0), default=10, help="0: no progress lines")
    parser.add_argument(
        "--checkpoint-every",
        type=bounded_int("--checkpoint-every", 0),
        default=10,
        help="save the checkpoint every N steps (0: only at the end)",
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write an inference .onnx model after training (into an existing folder; checked against the "
        "trained eval model)",
    )
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="accept samples with NaN/Inf inputs (refused by default) and skip any batch whose loss or gradient "
        "is not finite instead of stopping; the weights and checkpoints never take NaN values either way",
    )
    cache = parser.add_argument_group("feature cache (artifacts compiled with gfcompile --feature-cache)")
    cache.add_argument(
        "--cache-features",
        action="store_true",
        help="run the frozen prefix once per sample and train the tail on its cached outputs (same data order "
        "and weights); the cache is rebuilt when the data or the prefix model changes",
    )
    cache.add_argument(
        "--cache-memory-mb",
        type=positive_float("--cache-memory-mb"),
        default=1024.0,
        help="cached features kept in memory; the rest is read from the cache file through a memory map",
    )
    cache.add_argument(
        "--cache-dir", type=Path, default=None, help="where the cache file lives (default: CHECKPOINT.features)"
    )
