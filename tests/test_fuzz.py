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
