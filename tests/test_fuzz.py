"""Byte-mutation fuzzing of the compile entry point: every mutated model file is refused with a clean
GfError or compiles into artifacts that pass the ONNX checker. Any other exception is a bug.

The model is tiny (2 channels) so that most mutations land in its structure rather than its weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.pipeline import compile_model
from tests.tiny_models import ConvSpec, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = 100
SUBPROCESS_MUTATIONS = 3


def _seed_model() -> bytes:
    model = tiny_cnn([ConvSpec(2), ConvSpec(2, stride=2)], input_shape=(1, 6, 6), batch=2, classes=3)
    return model.SerializeToString()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip 1-8 bytes, overwrite a run with random bytes, truncate, duplicate or delete a slice."""
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:
        for index in rng.integers(0, len(data), rng.integers(1, 9)):
            data[index] ^= int(rng.integers(1, 256))
    elif kind == 1:
        start = int(rng.integers(0, len(data)))
        run = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        data[start : start + len(run)] = run
    elif kind == 2:
        data = data[: int(rng.integers(1, len(data)))]
    elif kind == 3:
        start = int(rng.integers(0, len(data)))
        data[start:start] = data[start : start + int(rng.integers(1, 32))]
    else:
        start = int(rng.integers(0, len(data)))
        del data[start : start + int(rng.integers(1, 32))]
    return bytes(data)


def _mutants() -> list[bytes]:
    rng = np.random.default_rng(20240607)
    seed = _seed_model()
    return [_mutate(seed, rng) for _ in range(MUTATIONS)]


def test_every_mutation_is_refused_or_compiles_to_a_valid_model(tmp_path: Path) -> None:
    outcomes = {"refused": 0, "compiled": 0}
    for index, mutant in enumerate(_mutants()):
        path = tmp_path / f"mutant{index}.onnx"
        path.write_bytes(mutant)
        out = tmp_path / f"out{index}"
        config = CompileConfig(train_layers=1, output_dir=out)
        try:
            compile_model(path, config, report=lambda message: None)
        except GfError as exc:
            assert "\n" not in str(exc).strip(), (index, str(exc))  # one line
            assert not out.exists(), index
            outcomes["refused"] += 1
            continue
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            onnx.checker.check_model(onnx.load(str(out / name)))
        outcomes["compiled"] += 1
    # Both outcomes occur, or the mutations were too weak (or too strong) to test anything.
    assert outcomes["refused"] >= 10 and outcomes["compiled"] >= 2, outcomes


@pytest.mark.parametrize("index", range(SUBPROCESS_MUTATIONS))
def test_mutations_through_the_command_line(tmp_path: Path, index: int) -> None:
    # Truncations and flips are the likeliest refusals; the CLI must print one line, no traceback.
    rng = np.random.default_rng(index)
    data = _seed_model()
    mutant = data[: len(data) // (index + 2)] if index < 2 else _mutate(data, rng)
    path = tmp_path / "mutant.onnx"
    path.write_bytes(mutant)
    command = [sys.executable, "-m", "gfcompile", str(path), "--train-layers", "1", "-o", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert len([line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]) == 1
        assert not (tmp_path / "out").exists()
    else:
        onnx.checker.check_model(onnx.load(str(tmp_path / "out" / "training_model.onnx")))


# --------------------------------------------------------------------------------------------
# Bundles and data files (issue 15)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A signed bundle of a tiny compile, its public key, and the compiled artifacts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gfcompile.bundle import make_bundle

    tmp = tmp_path_factory.mktemp("fuzz_bundle")
    model = tmp / "model.onnx"
    model.write_bytes(_seed_model())
    artifacts = compile_model(model, CompileConfig(train_layers=1, output_dir=tmp / "artifacts"), report=lambda m: None)
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp / "key.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return make_bundle(artifacts, tmp / "bundle", sign_key=tmp / "key.pem"), tmp / "key.pub", artifacts


def test_every_mutation_of_a_signed_bundle_is_refused_before_loading(signed_bundle) -> None:
    """Any changed byte of any file (models, checkpoint, manifest, SHA256SUMS, the signature) is refused."""
    from runtime.bundle import verify_bundle
    from runtime.errors import RunError

    bundle, public_key, _ = signed_bundle
    files = sorted(p for p in bundle.iterdir())
    rng = np.random.default_rng(15)
    refused = 0
    for index in range(MUTATIONS):
        target = files[index % len(files)]
        original = target.read_bytes()
        mutant = _mutate(original, rng)
        if mutant == original:
            continue
        target.write_bytes(mutant)
        try:
            with pytest.raises(RunError) as refusal:
                verify_bundle(bundle, trusted_key=public_key, notice=lambda message: None)
            assert "\n" not in str(refusal.value).strip(), (target.name, str(refusal.value))
            refused += 1
        finally:
            target.write_bytes(original)
    assert refused >= MUTATIONS * 0.9, refused
    verify_bundle(bundle, trusted_key=public_key, notice=lambda message: None)  # restored: accepted again


def test_every_mutation_of_a_data_file_is_refused_or_loads(signed_bundle, tmp_path: Path) -> None:
    """The .npz header reader meets mutated zips and .npy headers: a clean RunError or a checked dataset."""
    import json

    from runtime.data import load_npz
    from runtime.errors import RunError

    _, _, artifacts = signed_bundle
    manifest = json.loads((artifacts / "manifest.json").read_text())
    rng = np.random.default_rng(7)
    seed = tmp_path / "seed.npz"
    np.savez(seed, x=rng.standard_normal((4, 1, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 4))
    original = seed.read_bytes()
    outcomes = {"refused": 0, "loaded": 0}
    for index in range(MUTATIONS):
        path = tmp_path / f"mutant{index}.npz"
        path.write_bytes(_mutate(original, rng))
        try:
            data = load_npz(path, manifest)
        except RunError as exc:
            assert "\n" not in str(exc).strip(), (index, str(exc))
            outcomes["refused"] += 1
            continue
        assert data.x.shape[1:] == (1, 6, 6) and len(data.x) == len(data.y)
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= MUTATIONS // 2, outcomes
