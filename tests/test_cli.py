"""The CLI end to end in subprocesses: clear one-line errors, no traceback, no partial output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.zoo_helpers import ZOO_CASES, export_case

ROOT = Path(__file__).resolve().parents[1]


def gfcompile(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gfcompile", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    _, path = export_case(ZOO_CASES["mobilenet_v2"], tmp_path_factory.mktemp("cli_model"))
    return path


def _hostile_inputs(tmp: Path, model_path: Path) -> list[tuple[str, list, str]]:
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "text.onnx").write_text("this is not a protobuf\n" * 10)
    (tmp / "truncated.onnx").write_bytes(model_path.read_bytes()[:1000])
    return [
        ("missing file", [tmp / "nope.onnx"], "no such file"),
        ("directory", [tmp], "is a directory"),
        ("empty file", [tmp / "empty.onnx"], "file is empty"),
        ("not onnx", [tmp / "text.onnx"], "not"),
        ("truncated", [tmp / "truncated.onnx"], "not"),
        ("too many filter layers", [model_path, "--filter-layers", "999"], "the model has 52 conv layers"),
        ("negative train layers", [model_path, "--train-layers", "-1"], "out of range"),
        ("zero patch size", [model_path, "--filter-layers", "2", "--patch-size", "0"], "patch size must be >= 1"),
        ("patch larger than map", [model_path, "--filter-layers", "2", "--patch-size", "64"], "larger than conv"),
        ("bad input shape", [model_path, "--input-shape", "3,32"], "does not match input"),
    ]


def test_hostile_inputs_get_one_line_errors(tmp_path: Path, model_path: Path) -> None:
    for label, args, message in _hostile_inputs(tmp_path, model_path):
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        result = gfcompile(*args, "-o", out)
        assert result.returncode == 2, (label, result.stderr)
        assert "Traceback" not in result.stderr, label
        assert message in result.stderr, (label, result.stderr)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
        assert len(error_lines) == 1 and message in error_lines[0], (label, result.stderr)
        assert not out.exists(), label
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_non_empty_output_needs_force_and_is_replaced_whole(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    refused = gfcompile(model_path, "--train-layers", "1", "--batch-size", "2", "-o", out)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (out / "keep.txt").read_text() == "user data"

    forced = gfcompile(model_path, "--train-layers", "1", "--batch-size", "2", "-o", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_compile_train_eval_round_trip(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "artifacts"
    compiled = gfcompile(model_path, "--train-layers", "2", "--batch-size", "4", "--lr", "0.01", "-o", out)
    assert compiled.returncode == 0, compiled.stderr
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    trained = gfcompile(
        "train", out, "--data", tmp_path / "data.npz", "--steps", "8", "--export", tmp_path / "inf.onnx"
    )
    assert trained.returncode == 0, trained.stderr
    assert "trained 8 steps" in trained.stdout
    assert (tmp_path / "inf.onnx").is_file()
    evaluated = gfcompile("eval", out, "--data", tmp_path / "data.npz", "--checkpoint", out / "trained_checkpoint")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "accuracy" in evaluated.stdout

    np.savez(tmp_path / "bad.npz", x=x, y=y + 100)
    refused = gfcompile("train", out, "--data", tmp_path / "bad.npz", "--steps", "2")
    assert refused.returncode == 2 and "out of range for 10 classes" in refused.stderr
    assert "Traceback" not in refused.stderr
