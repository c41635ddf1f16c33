"""`gfcompile bundle` and the device runner: torch-free training from images, hash checks,
kill-and-resume, ORT-format models, and an inference export that matches PyTorch.

Authentication (a bundle is data that the installed runtime verifies; signatures, planted code,
a runtime-only install) is in tests/test_bundle_trust.py."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

from gfcompile.bundle import make_bundle, portable_files
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.__main__ import main as gftrain
from runtime.bundle import check_inference_model, open_trainer, verify_bundle
from runtime.data import Dataset, load_data, preprocess
from runtime.images import load_image_folder
from runtime.ort_training import training_api
from runtime.trainer import model_files
from tests.zoo_helpers import ZOO_CASES, export_case, torch

ROOT = Path(__file__).resolve().parents[1]
CASE = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, 48, 48))
BATCH = 4
PREPROCESS = {"scale": 1 / 255, "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.25, 0.25], "layout": "NCHW"}
BLOCK_IMPORTS = """
import sys
for blocked in ("torch", "onnx_graphsurgeon", "onnx", "gfcompile", "passes"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
"""


def _checkpoint_values(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    state = training_api().CheckpointState.load_checkpoint(str(path))
    step = int(state.properties["step"]) if "step" in state.properties else 0
    return step, {name: parameter.data.copy() for name, parameter in state.parameters}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_case(CASE, tmp_path_factory.mktemp("bundle_model"))


@pytest.fixture(scope="module")
def artifacts(exported, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle_artifacts") / "artifacts"
    config = CompileConfig(filter_layers=2, train_layers=3, batch_size=BATCH, lr=0.01, output_dir=out)
    return compile_model(exported[1], config, report=lambda message: None)


@pytest.fixture(scope="module")
def bundle(artifacts: Path, tmp_path_factory) -> Path:
    return make_bundle(artifacts, tmp_path_factory.mktemp("bundles") / "device", preprocess=PREPROCESS)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three classes of images of assorted sizes and modes (RGB, greyscale, palette; PNG and JPEG)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / str(label)
        folder.mkdir()
        for index in range(8):
            pixels = rng.integers(0, 256, size=(40 + 3 * index, 56, 3), dtype=np.uint8)
            pixels[..., label] = 220  # each class has a dominant colour
            image = Image.fromarray(pixels)
            if index == 5:
                image = image.convert("L")
            elif index == 6:
                image = image.convert("P")
            image.save(folder / f"{index}.{'jpg' if index % 2 else 'png'}")
    (root / "2" / "notes.txt").write_text("not an image; ignored")
    return root


def _run_device(script_args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """The installed runner in a child, run from inside the bundle, where torch, onnx and onnx-graphsurgeon
    cannot be imported. Isolated (-I): the working directory is not on the import path, as for `gftrain`."""
    script = (
        BLOCK_IMPORTS
        + f"""
sys.path.insert(0, {str(ROOT)!r})  # the runtime as installed from this checkout; never the bundle
from runtime.__main__ import main
code = main({script_args!r})
assert not [m for m in ("torch", "onnx_graphsurgeon", "onnx") if sys.modules.get(m) is not None]
print("RUNTIME_FROM", sys.modules["runtime"].__file__)
raise SystemExit(code)
"""
    )
    return subprocess.Popen([sys.executable, "-I", "-c", script], cwd=cwd, text=True, **popen)


def test_bundle_layout_and_manifest(bundle: Path, artifacts: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = set(manifest["files"])
    data = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "README.md"}
    data |= set(portable_files(json.loads((artifacts / "manifest.json").read_text())))  # plain-onnxruntime step
    assert names == data
    # Data only: no code ships, and SHA256SUMS covers every file, the manifest included.
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*data, "manifest.json", "SHA256SUMS"])
    sums = dict(reversed(line.split("  ")) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == data | {"manifest.json"}
    for name, digest in sums.items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest, name
    assert manifest["preprocess"]["mean"] == PREPROCESS["mean"]
    assert manifest["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert manifest["bundle"]["format"] == "onnx" and manifest["bundle"]["initial_checkpoint"] == "checkpoint"
    assert manifest["plan"] == json.loads((artifacts / "manifest.json").read_text())["plan"]
    readme = (bundle / "README.md").read_text()
    assert "gftrain THIS_FOLDER --data DATA" in readme and "SHA256SUMS" in readme
    verify_bundle(bundle, notice=lambda message: None)


def test_bundle_trains_from_images_without_torch_and_exports_a_model_pytorch_agrees_with(
    bundle: Path, images: Path, exported, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    shutil.copytree(bundle, device)
    exported_model = tmp_path / "model.onnx"
    args = [".", "--data", str(images), "--steps", "6", "--log-every", "2", "--export", str(exported_model)]
    child = _run_device(args, device, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert f"RUNTIME_FROM {ROOT / 'runtime' / '__init__.py'}" in out
    assert "step 6; checkpoint" in out and "matches the trained eval model" in out

    # Plain ONNX for plain onnxruntime: no training or contrib ops, an opset ORT 1.19 accepts.
    model = onnx.load(str(exported_model))
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not [node.op_type for node in model.graph.node if node.op_type.endswith("Grad") or "Loss" in node.op_type]
    assert all(opset.version <= 21 for opset in model.opset_import if opset.domain in ("", "ai.onnx"))
    session = onnxruntime.InferenceSession(str(exported_model), providers=["CPUExecutionProvider"])

    # The trained checkpoint's parameters, loaded into the PyTorch model by name, give the same outputs.
    step, trained = _checkpoint_values(device / "trained_checkpoint")
    assert step == 6
    _, initial = _checkpoint_values(device / "checkpoint")
    manifest = json.loads((device / "manifest.json").read_text())
    assert any(not np.array_equal(trained[name], initial[name]) for name in manifest["plan"]["trainable_params"])
    reference = copy.deepcopy(exported[0]).eval()
    named = dict(reference.named_parameters())
    with torch.no_grad():
        for name in manifest["plan"]["trainable_params"]:
            named[name].copy_(torch.from_numpy(trained[name]))
    x = load_data(images, manifest).x[:BATCH]
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    assert np.abs(actual - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_corrupted_or_incomplete_bundle_is_refused(bundle: Path, images: Path, tmp_path: Path, capsys) -> None:
    for name in ("eval_model.onnx", "checkpoint", "manifest.json", "README.md"):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(bundle, broken)
        blob = bytearray((broken / name).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (broken / name).write_bytes(bytes(blob))
        assert gftrain([str(broken), "--data", str(images), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("gfcompile: error:")]
        assert len(errors) == 1 and "Traceback" not in "".join(err), err
        assert f"{name} does not match its sha256 in SHA256SUMS" in errors[0]
        assert not (broken / "trained_checkpoint").exists()
    missing = tmp_path / "missing"
    shutil.copytree(bundle, missing)
    (missing / "optimizer_model.onnx").unlink()
    assert gftrain([str(missing), "--data", str(images), "--steps", "1"]) == 2
    assert "optimizer_model.onnx is missing" in capsys.readouterr().err


def test_killed_runner_resumes_with_no_lost_or_repeated_step(bundle: Path, images: Path, tmp_path: Path) -> None:
    total = 30
    device = tmp_path / "device"
    shutil.copytree(bundle, device)
    args = [".", "--data", str(images), "--steps", str(total), "--checkpoint-every", "1", "--log-every", "1"]

    # Killed with SIGKILL (no cleanup, as in a power loss) once a few checkpoints are written.
    child = _run_device(args, device, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = 0
    for line in child.stderr:
        match = re.match(r"step\s+(\d+)/", line)
        if match and int(match.group(1)) >= 4:
            seen = int(match.group(1))
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the runner ended by itself (saw step {seen})"
    killed_at, _ = _checkpoint_values(device / "trained_checkpoint")
    assert 3 <= killed_at < total

    # The same command again resumes at the last checkpoint and finishes.
    resumed = _run_device(args, device, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming from trained_checkpoint at step {killed_at}" in err
    steps_logged = [int(m) for m in re.findall(r"step\s+(\d+)/", err)]
    assert steps_logged == list(range(killed_at + 1, total + 1))

    # An uninterrupted run of the same bundle, into its own checkpoint.
    straight_path = str(tmp_path / "straight")  # outside: the bundle refuses files it does not list
    straight = _run_device(
        [*args, "--checkpoint", straight_path], device, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    step_a, resumed_values = _checkpoint_values(device / "trained_checkpoint")
    step_b, straight_values = _checkpoint_values(tmp_path / "straight")
    assert step_a == step_b == total
    manifest = json.loads((device / "manifest.json").read_text())
    for name in manifest["plan"]["trainable_params"]:
        np.testing.assert_allclose(resumed_values[name], straight_values[name], rtol=1e-6, atol=1e-7, err_msg=name)
    verify_bundle(device, notice=lambda message: None)  # the shipped checkpoint was never written


def test_ort_format_bundle_trains_like_the_onnx_one(artifacts: Path, bundle: Path, tmp_path: Path) -> None:
    ort_bundle = make_bundle(artifacts, tmp_path / "ort", ort_format=True, preprocess=PREPROCESS)
    manifest = json.loads((ort_bundle / "manifest.json").read_text())
    assert manifest["bundle"]["models"] == {
        "training": "training_model.ort",
        "eval": "eval_model.onnx",  # export_model_for_inferencing needs the ONNX eval model
        "optimizer": "optimizer_model.ort",
    }
    assert not (ort_bundle / "training_model.onnx").exists()
    rng = np.random.default_rng(0)
    data = Dataset(rng.standard_normal((8, *CASE.input_shape)).astype(np.float32), rng.integers(0, 10, 8))
    reference = open_trainer(bundle)
    trainer = open_trainer(ort_bundle)
    assert model_files(trainer.manifest)["training"] == "training_model.ort"
    assert model_files(reference.manifest)["training"] == "training_model.onnx"
    losses = [trainer.fit(data, 3, seed=1, log_every=0), reference.fit(data, 3, seed=1, log_every=0)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    trainer.export_inference(tmp_path / "inference.onnx")
    assert check_inference_model(tmp_path / "inference.onnx", trainer, data.x[:BATCH], data.y[:BATCH]) < 1e-4


def test_tar_gz_bundle_unpacks_to_a_verified_folder(artifacts: Path, tmp_path: Path) -> None:
    archive = make_bundle(artifacts, tmp_path / "device.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert "device/manifest.json" in names and "device/SHA256SUMS" in names
    assert not [name for name in names if name.endswith(".py")]
    verify_bundle(tmp_path / "unpacked" / "device", notice=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.tar.gz", "unpacked"]  # no staging left


def test_bundle_cli_errors_exit_2_with_one_line(artifacts: Path, tmp_path: Path) -> None:
    corrupted = tmp_path / "corrupted"
    shutil.copytree(artifacts, corrupted)
    (corrupted / "training_model.onnx").write_bytes(b"garbage")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep")
    cases = [
        ([tmp_path / "nope", "-o", tmp_path / "b1"], "no manifest.json"),
        ([corrupted, "-o", tmp_path / "b2"], "training_model.onnx does not match its sha256"),
        ([artifacts, "-o", tmp_path / "taken"], "--force"),
        ([artifacts, "-o", tmp_path / "b3", "--preprocess", '{"std": [0]}'], "std must be positive"),
        ([artifacts, "-o", tmp_path / "b4", "--preprocess", '{"mean": [1, 2]}'], "mean must be 1 or 3 numbers"),
        ([artifacts, "-o", tmp_path / "b5", "--preprocess", "{not json"], "not valid JSON"),
    ]
    for args, message in cases:
        command = [sys.executable, "-m", "gfcompile", "bundle", *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert (tmp_path / "taken" / "file").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("b")]


def test_image_folder_follows_the_compiled_geometry_and_preprocessing(tmp_path: Path) -> None:
    for name, colour in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (30, 20), colour).save(tmp_path / name / "a.png")
    spec = {"scale": 1 / 255, "mean": [0.5], "std": [0.5], "layout": "NHWC"}
    manifest = {
        "inputs": [{"shape": [2, 12, 16, 1]}],  # NHWC, greyscale, 12 x 16
        "outputs": [{"shape": [2, 2]}],
        "labels": [{"shape": [2]}],
        "loss": "cross_entropy",
        "preprocess": spec,
    }
    x, y, classes = load_image_folder(tmp_path, manifest)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 1]  # sorted names
    assert x.shape == (2, 12, 16, 1) and x.dtype == np.uint8
    expected_grey = [round(0.299 * 255), round(0.114 * 255)]  # ITU-R 601-2 luma of pure red, pure blue
    assert np.abs(x[:, 5, 5, 0].astype(int) - expected_grey).max() <= 1
    data = load_data(tmp_path, manifest)
    np.testing.assert_allclose(data.x, (x / 255 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(preprocess(x, spec), data.x)
