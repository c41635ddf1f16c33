"""Time accounting of the convergence suite (benchmarks/convergence.py) on hand-made curves.

The expected numbers are computed here from the raw arrays the curves are made of, not with the
suite's helpers: the target from exact's plateaus, the reach-and-hold evaluation by scanning from
the end, cached seconds = training seconds + the cache build, derived uncached seconds = steps x the
median seconds per step of the uncached stretches.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from benchmarks.convergence import PLATEAU_EVALS, TARGET_MARGIN, analyse

EVAL_EVERY = 10
# accuracy after 0, 10, ..., 60 steps, per seed
EXACT = [
    [0.2, 0.6, 0.80, 0.90, 0.91, 0.92, 0.92],
    [0.2, 0.5, 0.85, 0.88, 0.93, 0.91, 0.92],
    [0.2, 0.7, 0.90, 0.92, 0.90, 0.93, 0.94],
]
FILTERED = [
    [0.2, 0.7, 0.91, 0.92, 0.92, 0.92, 0.93],  # reaches early
    [0.2, 0.6, 0.92, 0.85, 0.91, 0.92, 0.92],  # crosses, dips, holds from 40 on
    [0.2, 0.6, 0.80, 0.85, 0.88, 0.89, 0.89],  # never reaches
]
# seconds per step of each 10-step stretch, per seed: filtered steps are cheaper with the cache
EXACT_STEP_S = [[0.30, 0.20, 0.21, 0.22, 0.20, 0.20], [0.20] * 6, [0.25, 0.19, 0.20, 0.20, 0.21, 0.22]]
FILTERED_STEP_S = [[0.15, 0.10, 0.11, 0.10, 0.10, 0.12], [0.12] * 6, [0.10] * 6]
UNCACHED_STEP_S = {"exact": [1.0, 1.1, 0.9], "r2": [0.8, 0.9, 1.0]}  # one 30-step uncached run of seed 0
BUILD_S = {"exact": 5.0, "r2": 5.0}


def run(seed: int, accuracies: list[float], step_s: list[float]) -> dict:
    seconds = np.concatenate([[0.0], np.cumsum(np.asarray(step_s) * EVAL_EVERY)])
    curve = [
        {"step": EVAL_EVERY * i, "train_s": float(seconds[i]), "accuracy": acc, "loss": 0.0, "train_loss": 0.0}
        for i, acc in enumerate(accuracies)
    ]
    return {"seed": seed, "steps": curve[-1]["step"], "train_s": curve[-1]["train_s"], "curve": curve}


def reach_index(accuracies: list[float], target: float) -> int | None:
    """From the end backwards: the earliest index after which nothing falls below the target."""
    index = None
    for i in range(len(accuracies) - 1, -1, -1):
        if accuracies[i] < target:
            break
        index = i
    return index


@pytest.fixture
def result() -> dict:
    runs = {
        "exact": [run(seed, acc, EXACT_STEP_S[seed]) for seed, acc in enumerate(EXACT)],
        "r2": [run(seed, acc, FILTERED_STEP_S[seed]) for seed, acc in enumerate(FILTERED)],
    }
    uncached = {
        "exact": [run(0, EXACT[0][:4], UNCACHED_STEP_S["exact"])],
        "r2": [run(0, [*FILTERED[0][:3], FILTERED[0][3] - 0.02], UNCACHED_STEP_S["r2"])],
    }
    return analyse(runs, BUILD_S, uncached)


def test_target_and_reach_and_hold(result) -> None:
    target = np.mean([np.mean(acc[-PLATEAU_EVALS:]) for acc in EXACT]) - TARGET_MARGIN
    assert result["target"] == pytest.approx(target)
    for key, curves in (("exact", EXACT), ("r2", FILTERED)):
        steps = [None if (i := reach_index(acc, target)) is None else EVAL_EVERY * i for acc in curves]
        reached = result["variants"][key]["reached"]
        assert [None if point is None else point["step"] for point in reached] == steps
    assert result["variants"]["r2"]["vs_exact"]["seeds_reached"] == 2


def test_cached_seconds_add_the_build_and_uncached_seconds_are_derived(result) -> None:
    target = result["target"]
    for key, curves, step_s in (("exact", EXACT, EXACT_STEP_S), ("r2", FILTERED, FILTERED_STEP_S)):
        clocks = result["variants"][key]["seconds_to_target"]
        uncached_step = statistics.median(UNCACHED_STEP_S[key])
        for seed, acc in enumerate(curves):
            i = reach_index(acc, target)
            if i is None:
                assert clocks["cached"][seed] is None and clocks["uncached (derived)"][seed] is None
                continue
            assert clocks["cached"][seed] == pytest.approx(BUILD_S[key] + EVAL_EVERY * sum(step_s[seed][:i]))
            assert clocks["uncached (derived)"][seed] == pytest.approx(EVAL_EVERY * i * uncached_step)
        all_stretches = [t for seed in step_s for t in seed]
        assert result["variants"][key]["step_s_median"] == pytest.approx(statistics.median(all_stretches))


def test_paired_comparison_uses_the_seeds_both_reached(result) -> None:
    cmp = result["variants"]["r2"]["vs_exact"]
    exact = result["variants"]["exact"]["seconds_to_target"]["cached"]
    mine = result["variants"]["r2"]["seconds_to_target"]["cached"]
    pairs = [(a, b) for a, b in zip(mine, exact, strict=True) if a is not None and b is not None]
    assert cmp["clocks"]["cached"]["pairs"] == len(pairs) == 2
    assert cmp["clocks"]["cached"]["seeds_faster"] == sum(a < b for a, b in pairs)
    assert cmp["clocks"]["cached"]["difference_s"]["mean"] == pytest.approx(np.mean([a - b for a, b in pairs]))
    assert cmp["uncached_step_time_ratio"] == pytest.approx(0.9 / 1.0)
    gaps = [np.mean(f[-PLATEAU_EVALS:]) - np.mean(e[-PLATEAU_EVALS:]) for f, e in zip(FILTERED, EXACT, strict=True)]
    assert cmp["plateau_gap"]["mean"] == pytest.approx(np.mean(gaps))
    assert cmp["plateau_gap"]["low"] < cmp["plateau_gap"]["mean"] < cmp["plateau_gap"]["high"]


def test_agreement_of_cached_and_uncached_curves(result) -> None:
    (exact,) = result["variants"]["exact"]["agreement"]
    assert exact["evals"] == 4 and exact["max_accuracy_difference"] == 0
    assert exact["uncached_reached"] is None  # a shorter run cannot say where it holds
    (filtered,) = result["variants"]["r2"]["agreement"]
    assert filtered["max_accuracy_difference"] == pytest.approx(0.02)
    crossing = next(EVAL_EVERY * i for i, acc in enumerate(FILTERED[0]) if acc >= result["target"])
    assert filtered["first_crossing"] == {"cached": crossing, "uncached": crossing}
