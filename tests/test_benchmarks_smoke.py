"""Smoke test of `python -m benchmarks`: the quick `analytic` and `layers` suites run end to end
in a subprocess (as CI and users run them) and write JSON with the expected keys and sane numbers.

About 45 s on 2 cores; the `memory` and `step` suites are exercised by `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_suite(suite: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", suite, "--profile", "quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
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
            grad_x = [shape for name, shape in run["outputs"].items() if name not in ("dw", "db")]
            full = [4, row["c"], row["h"], row["w"]]
            assert (grad_x == [full]) == key.endswith("_up")
        assert row["floor_s"] > 0
        assert all(fraction > 0 for fraction in row["floor_fraction"].values())
    assert set(data["summary"]["median_speedup"]) == variants
