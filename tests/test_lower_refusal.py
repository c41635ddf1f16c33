"""A training-graph op that no lower pass handles fails the compile in one line naming it, and
`--no-portable` compiles the same model for onnxruntime-training only (recorded in the manifest).

The model is a tiny CNN with a Tanh between two trained convs: ORT's gradient builder emits
com.microsoft TanhGrad for it, which no CNN of the zoo or of the torchvision matrix needs, so no
lower pass handles it. (If one ever does, pick another op here: the test is about the refusal.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx

from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def _tanh_cnn(path: Path) -> Path:
    model = tiny_cnn()
    (relu,) = [node for node in model.graph.node if node.name == "relu2"]
    relu.op_type = "Tanh"
    save(model, path)
    return path


def _gfcompile(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gfcompile", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_unlowerable_op_fails_the_compile_in_one_line_and_no_portable_compiles(tmp_path) -> None:
    model = _tanh_cnn(tmp_path / "tanh.onnx")
    common = ["--train-layers", "3", "--batch-size", "2", "-q"]
    refused = _gfcompile(model, "-o", tmp_path / "portable", *common)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("gfcompile: error: cannot lower TanhGrad '"), lines[0]
    assert lines[0].endswith(
        "to standard ONNX ops for the portable train step; "
        "compile with --no-portable to write artifacts for onnxruntime-training only"
    )
    assert not (tmp_path / "portable").exists()  # nothing published

    compiled = _gfcompile(model, "-o", tmp_path / "training_only", "--no-portable", *common)
    assert compiled.returncode == 0, compiled.stderr
    artifacts = tmp_path / "training_only"
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["config"]["portable"] is False
    assert manifest.get("portable") is None and manifest["passes"]["lower"] == []
    assert not (artifacts / "train_step.onnx").exists()
    training = onnx.load(str(artifacts / "training_model.onnx"))
    assert "TanhGrad" in {node.op_type for node in training.graph.node}


def test_portable_is_recorded_only_when_turned_off() -> None:
    from gfcompile.config import CompileConfig

    assert "portable" not in CompileConfig().to_json()  # ordinary manifests stay as they were
    assert CompileConfig(portable=False).to_json()["portable"] is False
