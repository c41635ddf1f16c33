"""Smoke test of `python -m benchmarks`: the quick `analytic`, `layers` and `accuracy` suites and one
quick `memory` configuration with the row-tiling variants run end to end in a subprocess (as CI and
users run them) and write JSON with the expected keys and sane numbers; the accuracy and memory
smokes also check that row-tiled training reproduces untiled training.

About 2 minutes on 2 cores; the whole `memory` and `step` suites are exercised by `make bench`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_suite(suite: str, out: Path, *extra: str, timeout: float = 300) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", suite, "--profile", "quick", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for suffix in ("json", "md", "png"):
        assert (out / f"{suite}.{suffix}").stat().st_size > 0, suffix
    assert "| ---" in (out / f"{suite}.md").read_text()
    payload = json.loads((out / f"{suite}.json").read_text())
    assert payload["suite"] == suite and payload["profile"] == "quick"
    machine = payload["machine"]
    assert machine["cpu_model"] and machine["usable_cores"] >= 1
    assert machine["ort_intra_op_threads"] == machine["usable_cores"]
    return payload["data"]


def test_analytic_quick(tmp_path: Path) -> None:
    data = run_suite("analytic", tmp_path)
    configs = data["configs"]
    assert {(c["model"], c["n"], c["r"]) for c in configs} == {
        (model, n, r) for model in ("mobilenet_v2", "resnet18") for n in (2, 4) for r in (2, 4, 7)
    }
    for config in configs:
        assert config["fits"], config  # the last 4 convs of both are 7x7 (or 14x14) at 224: r = 7 fits
        assert len(config["rows"]) == config["n"]
        totals = config["totals"]
        assert all(totals[key] > 0 for key in totals), totals
        # Filtering never costs more than the vanilla backward, and saves more as r grows.
        assert config["activation_ratio"] > 1 and config["flops_ratio"] > 1
        for row in config["rows"]:
            assert row["r"] == config["r"] and row["compiled_activation_bytes"] < row["vanilla_activation_bytes"]
    by_r = {c["r"]: c["activation_ratio"] for c in configs if c["model"] == "resnet18" and c["n"] == 4}
    assert by_r[2] < by_r[4] < by_r[7]


def test_layers_quick(tmp_path: Path) -> None:
    data = run_suite("layers", tmp_path)
    assert data["settings"]["batch"] == 4 and 2 <= len(data["rows"]) <= 3
    assert data["bandwidth"]["best_gbps"] > 0
    variants = {"r2_noup", "r2_up", "r4_noup", "r4_up"}
    for row in data["rows"]:
        assert row["exact"]["median_s"] > 0 and row["exact_gflops"] > 0
        assert set(row["filtered"]) == variants == set(row["speedup"])
        for key, result in row["filtered"].items():
            assert result["median_s"] > 0 and row["speedup"][key] > 0
            run = result["runs"][0]
            assert "Conv" not in run["ops"] and "ConvGrad" not in run["ops"]
            # The timed graph reads dY, the pooled input and W; grad_x is full size only with the upsample.
            assert sorted(run["inputs"]) == sorted(["gy", "conv/gf/x_pool", "w"])
            # Outputs keep the order (grad_x, dW, db); dW and grad_x may be cut before a view-Reshape.
            grad_x, grad_w, grad_b = run["outputs"].values()
            full = [4, row["c"], row["h"], row["w"]]
            assert (grad_x == full) == key.endswith("_up")
            assert math.prod(grad_w) == row["c"] * row["c"] * 9 and math.prod(grad_b) == row["c"]
        assert row["floor_s"] > 0
        assert all(fraction > 0 for fraction in row["floor_fraction"].values())
    assert set(data["summary"]["median_speedup"]) == variants


def test_accuracy_quick(tmp_path: Path) -> None:
    data = run_suite("accuracy", tmp_path)
    steps = data["settings"]["steps"]
    (group,) = data["groups"]
    assert group["size"] == 64 and group["variants"] == ["exact", "r2", "tiled", "tiled_r2"]
    for key in group["variants"]:
        (run,) = group["runs"][key]
        assert run["steps"] == steps == len(run["losses"]) and run["test_samples"] == 225
        # The pretrained head has never predicted 5-9; a few steps of fine-tuning must lower the loss.
        assert run["test_accuracy_before"] == 0.0 and 0.0 <= run["test_accuracy"] <= 1.0
        assert run["losses"][-1] < run["losses"][0]
    compiled = group["compiled"]
    assert compiled["exact"]["filtered"] == {} and len(compiled["r2"]["filtered"]) == 4
    for tiled, untiled in (("tiled", "exact"), ("tiled_r2", "r2")):
        # The comparison is only meaningful if the tiled graph really differs: one conv per band.
        assert compiled[tiled]["row_tiles"] == 8 and compiled[untiled]["row_tiles"] == 0
        assert compiled[tiled]["training_conv_nodes"] > compiled[untiled]["training_conv_nodes"]
        check = group["exactness"][tiled]
        (seed,) = check["per_seed"]
        assert seed["accuracy_equal"] and check["accuracy_equal_every_seed"], check
        assert seed["param_tensors"] == len(compiled[untiled]["trainable_params"])
        assert check["max_param_diff"] <= 1e-6 and check["max_train_loss_diff"] <= 1e-6, check
    # Filtering changes the gradient, so the same comparison tells filtered and exact runs apart.
    assert group["runs"]["r2"][0]["losses"][1:] != group["runs"]["exact"][0]["losses"][1:]


def test_convergence_quick(tmp_path: Path) -> None:
    # Five compiles-and-trainings worth of workers (cached, uncached, cache build, SNR): slower than the rest.
    data = run_suite("convergence", tmp_path, timeout=900)
    settings = data["settings"]
    (group,) = data["groups"]
    assert (group["size"], group["n"], group["skipped"]) == (64, 2, {})
    evals = settings["steps"] // settings["eval_every"] + 1
    for key, runs in group["runs"].items():
        assert [run["seed"] for run in runs] == list(settings["seeds"])
        for run, reached in zip(runs, group["variants"][key]["reached"], strict=True):
            curve = run["curve"]
            assert len(curve) == evals and curve[-1]["step"] == settings["steps"]
            assert all(a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:], strict=False))
            # Reached and held: every evaluation from the reported one on is at or above the target.
            if reached is None:
                assert curve[-1]["accuracy"] < group["target"]
            else:
                later = [p["accuracy"] for p in curve if p["step"] >= reached["step"]]
                assert min(later) >= group["target"]
    # Same seed, same batches and weights: only the gradients differ, so the curves must too.
    exact, filtered = group["runs"]["exact"][0]["curve"], group["runs"]["r2"][0]["curve"]
    assert [p["train_loss"] for p in exact[1:]] != [p["train_loss"] for p in filtered[1:]]
    # Filtering changes only the backward: exact and r=2 share one prefix model, so one cache build.
    caches = group["caches"]
    assert caches["exact"]["prefix_sha256"] == caches["r2"]["prefix_sha256"]
    for key, variant in group["variants"].items():
        build = caches[key]["train_build_s"]
        for point, seconds in zip(variant["reached"], variant["seconds_to_target"]["cached"], strict=True):
            assert seconds is None if point is None else seconds == build + point["s"]
        # The same seed through the whole graph follows the cached curve (weights agree to ~1e-6).
        (check,) = variant["agreement"]
        assert check["evals"] == settings["uncached_steps"] // settings["eval_every"] + 1, check
        assert check["max_accuracy_difference"] <= 0.01, check
    layers = group["snr"]["r2"]["layers"]
    assert len(layers) == 2 and all(layer["r"] == 2 for layer in layers)
    for layer in layers:
        assert math.isfinite(layer["measured_snr_db"]) and math.isfinite(layer["predicted_snr_db"])
        assert 0 < layer["cosine"] < 1


def test_memory_quick_row_tiling(tmp_path: Path) -> None:
    data = run_suite("memory", tmp_path, "--models", "mobilenet_v2", "--variants", "ort_tiled,ort_tiled_filtered")
    (entry,) = data["entries"]
    assert entry["config"] == {"model": "mobilenet_v2", "size": 112, "batch": 4}
    variants = entry["variants"]
    # The two baselines always run, since every ratio is against them.
    assert list(variants) == ["torch_exact", "ort_exact", "ort_tiled", "ort_tiled_filtered"]
    for name, result in variants.items():
        assert result["hwm_reset"] and result["step1_delta_mib"] > 0, (name, result)
        for base in ("torch_exact", "ort_exact"):
            expected = result["step1_delta_mib"] / variants[base]["step1_delta_mib"]
            assert abs(result[f"step1_vs_{base}"] - expected) < 1e-12
    options = entry["compiler"]["session_options"]
    assert options["ort_exact"]["enable_mem_pattern"] and not options["ort_tiled"]["enable_mem_pattern"]
    runs = {name: result["runs"][0] for name, result in variants.items()}
    # Same seed, weights and batch: row tiling computes the same forward and gradients, so even the loss
    # after one AdamW update is the same; filtering changes the gradients, hence that loss.
    assert runs["ort_tiled"]["loss"] == runs["ort_exact"]["loss"] == runs["ort_tiled_filtered"]["loss"], runs
    assert runs["ort_tiled"]["loss2"] == runs["ort_exact"]["loss2"] != runs["ort_tiled_filtered"]["loss2"], runs
    # torch eager builds the same seeded weights and computes the forward independently.
    assert abs(runs["torch_exact"]["loss"] - runs["ort_exact"]["loss"]) <= 1e-4 * runs["ort_exact"]["loss"]
    assert data["goal"] == {
        "config": ["mobilenet_v2", 224, 32],
        "variant": "ort_tiled_filtered",
        "max_ratio": 0.3,
        "measured": False,
    }
