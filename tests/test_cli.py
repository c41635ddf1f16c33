"""The CLI end to end in subprocesses: --force, and a compile -> train -> eval round trip that checks the weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.data import load_data
from runtime.trainer import Trainer
from tests.zoo_helpers import ZOO_CASES, export_case

ROOT = Path(__file__).resolve().parents[1]


def gfcompile(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gfcompile", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    _, path = export_case(ZOO_CASES["mobilenet_v2"], tmp_path_factory.mktemp("cli_model"))
    return path


# The hostile-input table moved to tests/test_hostile_inputs.py (every entry point, one subprocess).


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


EVAL_LINE = re.compile(r"loss (?P<loss>-?[0-9.]+)(?:, accuracy (?P<accuracy>[0-9.]+)%)? over (?P<samples>\d+) samples")


def _eval_numbers(stdout: str) -> tuple[float, float, int]:
    match = EVAL_LINE.search(stdout)
    assert match, stdout
    return float(match["loss"]), float(match["accuracy"]), int(match["samples"])


def test_compile_train_eval_round_trip(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "artifacts"
    compiled = gfcompile(model_path, "--train-layers", "2", "--batch-size", "4", "--lr", "0.01", "-o", out)
    assert compiled.returncode == 0, compiled.stderr
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    untrained = gfcompile("eval", out, "--data", tmp_path / "data.npz")
    assert untrained.returncode == 0, untrained.stderr
    trained = gfcompile(
        "train", out, "--data", tmp_path / "data.npz", "--steps", "8", "--export", tmp_path / "inf.onnx"
    )
    assert trained.returncode == 0, trained.stderr
    assert "trained 8 steps" in trained.stdout
    assert (tmp_path / "inf.onnx").is_file()

    # Training changed the trainable weights of the saved checkpoint and nothing else.
    initial = Trainer(out)
    after = Trainer(out, checkpoint=out / "trained_checkpoint")
    assert after.step == 8
    plan = initial.manifest["plan"]
    for name in plan["trainable_params"]:
        assert not np.array_equal(after.state.parameters[name].data, initial.state.parameters[name].data), name
    for name in plan["frozen_params"]:
        np.testing.assert_array_equal(after.state.parameters[name].data, initial.state.parameters[name].data)

    # eval reads the trained checkpoint: its numbers are the Trainer's own evaluation of it, not the untrained ones.
    evaluated = gfcompile("eval", out, "--data", tmp_path / "data.npz", "--checkpoint", out / "trained_checkpoint")
    assert evaluated.returncode == 0, evaluated.stderr
    loss, accuracy, samples = _eval_numbers(evaluated.stdout)
    expected = after.evaluate(load_data(tmp_path / "data.npz", after.manifest))
    assert samples == expected.samples == 16
    assert abs(loss - expected.loss) <= 1e-4 and abs(accuracy - 100 * expected.accuracy) <= 0.051  # printed to 0.1%
    untrained_loss, _, _ = _eval_numbers(untrained.stdout)
    assert abs(untrained_loss - initial.evaluate(load_data(tmp_path / "data.npz", initial.manifest)).loss) <= 1e-4
    assert abs(loss - untrained_loss) > 1e-3, (loss, untrained_loss)

    np.savez(tmp_path / "bad.npz", x=x, y=y + 100)
    refused = gfcompile("train", out, "--data", tmp_path / "bad.npz", "--steps", "2", "--save", tmp_path / "bad_run")
    assert refused.returncode == 2 and "out of range for 10 classes" in refused.stderr
    assert "Traceback" not in refused.stderr
