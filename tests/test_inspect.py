"""`gfcompile inspect`: the per-layer table, the peak-memory estimate, the plot, and planning an uncompiled model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.inspection import MEMORY_TERMS, inspect_path, peak_bytes
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.pipeline import compile_model
from gfcompile.planning import select_layers
from runtime.ort_training import training_api
from tests.zoo_helpers import ZOO_CASES, export_case

ROOT = Path(__file__).resolve().parents[1]
CASE = dataclasses.replace(ZOO_CASES["resnet18"], input_shape=(3, 64, 64))
BATCH = 2


def gfcompile(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gfcompile", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    _, path = export_case(CASE, tmp_path_factory.mktemp("inspect_model"))
    return path


@pytest.fixture(scope="module")
def artifacts(model_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect_artifacts") / "artifacts"
    config = CompileConfig(filter_layers=3, train_layers=4, batch_size=BATCH, output_dir=out)
    return compile_model(model_path, config, report=lambda message: None)


def test_table_of_compiled_artifacts(artifacts: Path) -> None:
    result = gfcompile("inspect", artifacts)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "saved act" in text and "bwd MFLOP" in text
    assert text.count("filter r=2") == 3 and text.count(" train ") >= 2  # 1 exact conv + the fc head
    assert "layer4.1.conv2" in text and "Conv3x3" in text and "512x2x2" in text
    assert "total (5 of 21 layers train)" in text
    assert "estimated peak memory of one training step (batch 2)" in text
    assert "= peak (estimate)" in text


def test_numbers_agree_with_the_plan_and_the_checkpoint(artifacts: Path) -> None:
    report = json.loads(gfcompile("inspect", artifacts, "--format", "json").stdout)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    layers = {row["node"]: row for row in report["layers"]}
    plan = manifest["plan"]
    assert [row["node"] for row in report["layers"] if row["trainable"] and row["op"] != "Gemm"] == sorted(
        plan["trainable_convs"], key=list(layers).index
    )
    for name, r in plan["filtered"].items():
        assert layers[name]["status"] == "filter" and layers[name]["r"] == r
    # The compile table is per sample; inspect reports the compiled batch.
    for row in manifest["layers"]["rows"]:
        assert layers[row["layer"]]["compiled_activation_bytes"] == row["compiled_activation_bytes"] * BATCH
        assert layers[row["layer"]]["vanilla_backward_flops"] == row["vanilla_backward_flops"] * BATCH
        if row["r"]:
            assert layers[row["layer"]]["compiled_backward_flops"] < layers[row["layer"]]["vanilla_backward_flops"]
    frozen = [row for row in report["layers"] if row["status"] == "frozen"]
    assert frozen and all(row["compiled_activation_bytes"] == 0 for row in frozen)

    memory = report["memory"]
    state = training_api().CheckpointState.load_checkpoint(str(artifacts / "checkpoint"))
    trainable = sum(parameter.data.nbytes for name, parameter in state.parameters if parameter.requires_grad)
    assert memory["gradients"] == trainable
    assert memory["optimizer_state"] == 2 * trainable  # AdamW: two moments
    assert memory["saved_activations"] > 0 and memory["largest_transient"] > 0
    assert memory["peak_estimate"] == sum(memory[key] for key, _ in MEMORY_TERMS)


def test_filtering_shrinks_the_measured_saved_activations(model_path: Path, artifacts: Path, tmp_path: Path) -> None:
    config = CompileConfig(filter_layers=0, train_layers=4, batch_size=BATCH, output_dir=tmp_path / "exact")
    exact = inspect_path(compile_model(model_path, config, report=lambda message: None))
    filtered = inspect_path(artifacts)
    assert filtered.memory["saved_activations"] < exact.memory["saved_activations"]
    assert filtered.memory["gradients"] == exact.memory["gradients"]  # same trainable tensors
    assert peak_bytes(filtered.memory) == sum(filtered.memory[key] for key, _ in MEMORY_TERMS)


def test_plot_writes_a_png(artifacts: Path, tmp_path: Path) -> None:
    result = gfcompile("inspect", artifacts, "--plot", tmp_path / "plots" / "memory.png")
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "plots" / "memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_uncompiled_model_lists_what_filter_layers_would_pick(model_path: Path) -> None:
    result = gfcompile("inspect", model_path, "--filter-layers", "4", "--batch-size", str(BATCH))
    assert result.returncode == 0, result.stderr
    config = CompileConfig(filter_layers=4, batch_size=BATCH)
    plan = select_layers(pin_shapes(load_and_validate(model_path), config), config)
    picked = [plan.conv(name).weight.removesuffix(".weight") for name in plan.trainable_convs]
    assert picked == ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    assert "not compiled; --filter-layers 4 --train-layers 4 would train 4 convs" in result.stdout
    for name in picked:
        assert f"  {name}  (gradient filter r=2)" in result.stdout
    report = json.loads(gfcompile("inspect", model_path, "--filter-layers", "4", "--format", "json").stdout)
    # The same convs; listed in the legalized graph's order, which the compile plans on.
    assert sorted(report["selection"]["trainable_convs"]) == sorted(picked)
    assert report["batch"] == 32  # the compile default when the model's batch is dynamic
    assert np.isclose(report["memory"]["gradients"] * 2, report["memory"]["optimizer_state"])


def test_inspect_errors_exit_2_with_one_line(artifacts: Path, model_path: Path, tmp_path: Path) -> None:
    cases = [
        ([tmp_path / "missing"], "no such file or directory"),
        ([artifacts, "--filter-layers", "2"], "is compiled already"),
        ([model_path, "--filter-layers", "999"], "out of range"),
        ([tmp_path], "no manifest.json"),
    ]
    for args, message in cases:
        result = gfcompile("inspect", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
