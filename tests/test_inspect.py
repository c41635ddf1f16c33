"""`gfcompile inspect`: the per-layer table, the peak-memory estimate, the plot, and planning an uncompiled model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.inspection import inspect_path, peak_bytes
from gfcompile.loading import load_and_validate, pin_shapes
from gfcompile.pipeline import compile_model
from gfcompile.planning import select_layers
from runtime.ort_training import training_api
from tests.peak_memory import CAN_MEASURE, SKIP_REASON, training_step_peak_bytes
from tests.tiny_models import ConvSpec, tiny_cnn
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
    frozen = [row for row in report["layers"] if row["status"] == "frozen"]
    assert frozen and all(row["compiled_activation_bytes"] == 0 for row in frozen)

    # Gradients and optimizer state, counted from the checkpoint ORT loads.
    memory = report["memory"]
    state = training_api().CheckpointState.load_checkpoint(str(artifacts / "checkpoint"))
    trainable = sum(parameter.data.nbytes for name, parameter in state.parameters if parameter.requires_grad)
    assert memory["gradients"] == trainable
    assert memory["optimizer_state"] == 2 * trainable  # AdamW: two moments


def test_hand_counted_tiny_net(tmp_path: Path) -> None:
    # Input 2x8x8 -> conv1 3x3 (4 ch, frozen) -> ReLU -> conv2 3x3 (4 ch, filtered r=2) -> ReLU -> GAP -> fc (3),
    # batch 2. Every number below is worked out by hand.
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn([ConvSpec(4), ConvSpec(4)], input_shape=(2, 8, 8), classes=3), str(model))
    out = tmp_path / "artifacts"
    compiled = gfcompile(model, "--filter-layers", "1", "--train-layers", "1", "--batch-size", "2", "-o", out)
    assert compiled.returncode == 0, compiled.stderr
    report = json.loads(gfcompile("inspect", out, "--format", "json").stdout)
    rows = {row["node"]: row for row in report["layers"]}
    counts = (
        "vanilla_activation_bytes",
        "compiled_activation_bytes",
        "vanilla_backward_flops",
        "compiled_backward_flops",
    )
    assert [rows["conv1"][key] for key in counts] == [0, 0, 0, 0]  # frozen: nothing saved, no backward
    # conv2, the first trainable conv (grad_W only): input 4x8x8 fp32 = 1024 B per sample, x~ 4x4x4 = 256 B;
    # MACs 4*8*8*4*9 = 9216, 2 FLOPs each; filtered: mean pool 4*8*8 = 256 adds + grad_W 2*4*4*(4*4) = 512.
    assert [rows["conv2"][key] for key in counts] == [2 * 1024, 2 * 256, 2 * 2 * 9216, 2 * (256 + 512)]
    # fc: input 4 floats per sample; grad_W and grad_x, each 2*4*3 FLOPs per sample.
    assert [rows["fc"][key] for key in counts] == [2 * 16, 2 * 16, 2 * 2 * 2 * 4 * 3, 2 * 2 * 2 * 4 * 3]

    memory = report["memory"]
    # Trainable: conv2 4*4*9 + 4, fc 3*4 + 3 = 163 floats; AdamW keeps two moments of each.
    assert memory["gradients"] == 163 * 4 and memory["optimizer_state"] == 2 * 163 * 4
    # Checkpoint: conv1 4*2*9 + 4 = 76 floats, plus the 163 trainable ones (the graph's constants come on top).
    assert memory["parameters"] >= (76 + 163) * 4
    # What the backward reads from the forward: x~ of conv2 in 2x4x4x4 fp32 (512 B), conv2's ReLU mask
    # as 2x4x8x8 bools (512 B), the fc input 2x4 fp32 (32 B), the logits' gradient 2x3 fp32 (24 B), and
    # the int64[4] input shapes of the GAP and Flatten gradients (2 x 32 B).
    assert memory["saved_activations"] == 512 + 512 + 32 + 24 + 2 * 32
    assert memory["largest_transient"] >= 2 * 2048  # at least a ReLU's 2x4x8x8 fp32 input and output


@pytest.mark.skipif(not CAN_MEASURE, reason=SKIP_REASON)
def test_estimate_tracks_the_measured_peak(tmp_path: Path) -> None:
    # Four 32-channel 3x3 convs at 128x128, batch 4 (2 MiB per activation and sample); the last 3 train,
    # exactly or filtered with r=4. Peak = VmHWM of a fresh process during one step, minus VmRSS before it
    # (the parameters and optimizer state are resident before, and are a few hundred KiB here).
    model = tmp_path / "chain.onnx"
    onnx.save(tiny_cnn([ConvSpec(32)] * 4, input_shape=(3, 128, 128)), str(model))
    estimated, measured = {}, {}
    for label, filtered in (("exact", 0), ("filtered", 3)):
        config = CompileConfig(
            filter_layers=filtered, train_layers=3, patch_size=4, batch_size=4, output_dir=tmp_path / label
        )
        artifacts = compile_model(model, config, report=lambda message: None)
        estimated[label] = peak_bytes(inspect_path(artifacts).memory)
        measured[label] = training_step_peak_bytes(artifacts, (4, 3, 128, 128), [1, 0, 2, 3])
    # Measured on this machine: exact 46.6 MB estimated / 60.7 MB measured, filtered 28.3 / 44.5; the
    # estimate leaves out ORT's own scratch buffers, so it is low by a similar amount in both.
    for label in estimated:
        assert 0.5 * measured[label] <= estimated[label] <= 1.2 * measured[label], (label, estimated, measured)
    saved_estimate = estimated["exact"] - estimated["filtered"]
    saved_measured = measured["exact"] - measured["filtered"]
    assert 0.6 * saved_estimate <= saved_measured <= 1.5 * saved_estimate, (estimated, measured)


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
