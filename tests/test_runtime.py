"""The device runtime: torch-free import, resume without lost or repeated steps, optimizers, NaN guard."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.data import Dataset
from runtime.errors import RunError
from runtime.trainer import Trainer
from tests.zoo_helpers import ZOO_CASES, export_case, relative_error, torch

ROOT = Path(__file__).resolve().parents[1]
CASE = ZOO_CASES["mobilenet_v2"]
BATCH = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    return export_case(CASE, directory)


def _compile(onnx_path: Path, out: Path, **overrides) -> Path:
    config = CompileConfig(train_layers=2, batch_size=BATCH, output_dir=out, **overrides)
    return compile_model(onnx_path, config, report=lambda message: None)


def _dataset(samples: int = 24, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *CASE.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, size=samples).astype(np.int64)
    return Dataset(x=x, y=y)


def _trainable_values(trainer: Trainer) -> dict[str, np.ndarray]:
    return {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


def test_runtime_trains_in_a_process_without_torch_or_graphsurgeon(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    artifacts = _compile(onnx_path, tmp_path / "artifacts")
    data = _dataset()
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    script = f"""
import sys
sys.modules["torch"] = None              # any `import torch` now raises ImportError
sys.modules["onnx_graphsurgeon"] = None
sys.modules["onnx"] = None               # the manifest, checkpoints and export need no onnx package either
sys.path.insert(0, {str(ROOT)!r})
from runtime.__main__ import main
code = main([{str(artifacts)!r}, "--data", {str(tmp_path / "data.npz")!r}, "--steps", "3"])
assert code == 0, code
code = main([{str(artifacts)!r}, "--data", {str(tmp_path / "data.npz")!r}, "--steps", "5", "--export",
             {str(tmp_path / "model.onnx")!r}])
assert code == 0, code
assert "torch" not in [name for name, module in sys.modules.items() if module is not None]
print("TORCH_FREE_OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TORCH_FREE_OK" in result.stdout
    assert (artifacts / "trained_checkpoint").is_file() and (artifacts / "trained_checkpoint.sha256").is_file()
    assert Trainer(artifacts, checkpoint=artifacts / "trained_checkpoint").step == 5  # resumed from step 3
    assert (tmp_path / "model.onnx").is_file()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_repeats_and_loses_no_step(exported, tmp_path: Path, optimizer: str) -> None:
    _, onnx_path = exported
    artifacts = _compile(onnx_path, tmp_path / "artifacts", optimizer=optimizer, lr=0.01)
    data = _dataset()

    straight = Trainer(artifacts)
    straight.fit(data, steps=7, seed=3, log_every=0)

    first = Trainer(artifacts)
    first.fit(data, steps=4, seed=3, log_every=0)
    first.save(tmp_path / "ckpt")
    resumed = Trainer(artifacts, checkpoint=tmp_path / "ckpt")
    assert resumed.step == 4
    resumed.fit(data, steps=3, seed=3, log_every=0)

    assert resumed.step == straight.step == 7
    for name, value in _trainable_values(straight).items():
        np.testing.assert_allclose(resumed.state.parameters[name].data, value, rtol=1e-6, atol=1e-7)


def test_sgd_momentum_matches_pytorch(exported, tmp_path: Path) -> None:
    model, onnx_path = exported
    model = copy.deepcopy(model)  # the fixture's model is shared; this test updates its weights
    lr, momentum = 0.05, 0.9
    artifacts = _compile(onnx_path, tmp_path / "artifacts", optimizer="sgd", lr=lr, momentum=momentum)
    trainer = Trainer(artifacts)
    data = _dataset(samples=BATCH * 3)

    named = dict(model.named_parameters())
    trainable = trainer.trainable
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainable)
    reference = torch.optim.SGD([named[name] for name in trainable], lr=lr, momentum=momentum)
    model.eval()
    for step in range(3):
        x, y = data.x[step * BATCH : (step + 1) * BATCH], data.y[step * BATCH : (step + 1) * BATCH]
        trainer.train_step(x, y)
        reference.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        reference.step()
    for name in trainable:
        assert relative_error(trainer.state.parameters[name].data, named[name].detach().numpy()) < 1e-4, name


def test_nan_loss_stops_and_keeps_last_good_weights(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    artifacts = _compile(onnx_path, tmp_path / "artifacts")
    trainer = Trainer(artifacts)
    data = _dataset()
    trainer.fit(data, steps=2, log_every=0)
    before = _trainable_values(trainer)
    bad = data.x[:BATCH].copy()
    bad[:] = np.nan
    with pytest.raises(RunError, match="step 3: the loss is"):
        trainer.train_step(bad, data.y[:BATCH])
    assert trainer.step == 2
    for name, value in before.items():
        np.testing.assert_array_equal(trainer.state.parameters[name].data, value)


def test_corrupted_artifact_is_refused(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    artifacts = _compile(onnx_path, tmp_path / "artifacts")
    model_file = artifacts / "training_model.onnx"
    blob = bytearray(model_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model_file.write_bytes(bytes(blob))
    with pytest.raises(RunError, match="does not match its sha256"):
        Trainer(artifacts)


def test_manifest_records_what_was_compiled(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    artifacts = _compile(onnx_path, tmp_path / "artifacts")
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["versions"] == {"onnxruntime": "1.19.2", "onnx": "1.16.2"}
    assert manifest["inputs"] == [{"name": "input", "shape": [BATCH, *CASE.input_shape], "dtype": "float32"}]
    assert manifest["labels"] == [{"name": "labels", "shape": [BATCH], "dtype": "int64"}]
    assert manifest["passes"]["forward"] and manifest["config"]["train_layers"] == 2
    assert set(manifest["files"]) >= {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"}


def test_adamw_matches_pytorch(exported, tmp_path: Path) -> None:
    model, onnx_path = exported
    model = copy.deepcopy(model)  # the fixture's model is shared; this test updates its weights
    lr, weight_decay = 0.01, 0.05
    artifacts = _compile(onnx_path, tmp_path / "artifacts", optimizer="adamw", lr=lr, weight_decay=weight_decay)
    trainer = Trainer(artifacts)
    data = _dataset(samples=BATCH * 3)
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainer.trainable)
    # onnxblock's AdamW uses eps = 1e-6 and bias correction, like torch's with that eps.
    reference = torch.optim.AdamW(
        [named[name] for name in trainer.trainable], lr=lr, eps=1e-6, weight_decay=weight_decay
    )
    model.eval()
    for step in range(3):
        x, y = data.x[step * BATCH : (step + 1) * BATCH], data.y[step * BATCH : (step + 1) * BATCH]
        trainer.train_step(x, y)
        reference.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        reference.step()
    for name in trainer.trainable:
        assert relative_error(trainer.state.parameters[name].data, named[name].detach().numpy()) < 1e-4, name


def test_mse_loss_matches_pytorch(exported, tmp_path: Path) -> None:
    model, onnx_path = exported
    model = copy.deepcopy(model)  # the fixture's model is shared; this test updates its weights
    artifacts = _compile(onnx_path, tmp_path / "artifacts", loss="mse")
    trainer = Trainer(artifacts)
    assert trainer.manifest["loss"] == "mse" and trainer.manifest["labels"][0]["name"] == "target"
    rng = np.random.default_rng(5)
    x = rng.standard_normal((BATCH, *CASE.input_shape)).astype(np.float32)
    target = rng.standard_normal((BATCH, 10)).astype(np.float32)
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainer.trainable)
        parameter.grad = None
    model.eval()
    reference = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(target))
    reference.backward()
    trainer.module.train()
    loss = float(trainer.module(x, target)[0])
    assert abs(loss - float(reference.detach())) <= 1e-5 * max(1.0, abs(loss))
    for name in trainer.trainable:
        assert relative_error(trainer.state.parameters[name].grad, named[name].grad.numpy()) <= 1e-4, name
