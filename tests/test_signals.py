"""Stop signals and concurrent compiles (issue 15, V6 and V7), with real signals sent to real processes.

SIGTERM (timeout, CI cancellation, docker stop) and SIGHUP (a closed terminal) must leave what
Ctrl-C leaves: no staging folder, exit 128 + signal, one line. A compile killed with SIGKILL cannot
clean up; the next compile to the same output sweeps its staging folder because its owner is dead.
Without --force, an output that appears while a compile runs is never replaced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return Path(save(tiny_cnn(seed=0), tmp_path_factory.mktemp("signals") / "tiny.onnx"))


def _compile(model: Path, out: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "gfcompile", model, "--train-layers", "2", "--batch-size", "2", "-o", out, *flags]
    return subprocess.Popen(list(map(str, command)), cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _wait_for(process: subprocess.Popen, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, "finished before it reached the point under test"
        assert time.monotonic() < deadline, "never reached the point under test"
        time.sleep(0.005)


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_during_compile_leave_nothing(model: Path, tmp_path: Path, signum: int) -> None:
    process = _compile(model, tmp_path / "out")
    _wait_for(process, lambda: bool(_staging(tmp_path)))
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("gfcompile:")]
    assert lines == [f"gfcompile: interrupted ({signal.Signals(signum).name}); no partial output was left"], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_compiles_staging_folder_is_swept_by_the_next_compile(model: Path, tmp_path: Path) -> None:
    process = _compile(model, tmp_path / "out")
    _wait_for(process, lambda: bool(_staging(tmp_path)))
    process.kill()  # SIGKILL: no handler runs, as in a power loss or the OOM killer
    process.wait(timeout=60)
    (left,) = _staging(tmp_path)
    assert left.name.startswith(f".out.staging-{process.pid}-")
    # A staging folder of a live process (this one) and one of another output are left alone.
    alive = tmp_path / f".out.staging-{os.getpid()}-live"
    alive.mkdir()
    other = tmp_path / f".other.staging-{process.pid}-keep"
    other.mkdir()
    again = _compile(model, tmp_path / "out", "-q")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, alive.name, "out"])
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_an_output_that_appears_during_a_compile_is_not_replaced(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = _compile(model, out)
    other_run = tmp_path.parent / f"{tmp_path.name}-other-run"  # another run's finished output, moved in whole
    other_run.mkdir()
    (other_run / "precious.txt").write_text("another run's result")
    _wait_for(process, lambda: bool(_staging(tmp_path)))  # past the up-front check of the output
    os.rename(other_run, out)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("gfcompile: error:")]
    assert len(errors) == 1 and "became a directory that is not empty while this ran" in errors[0], stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "another run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging removed


def test_two_concurrent_compiles_to_one_output_one_wins_and_the_other_is_refused(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    racers = [_compile(model, out, "--lr", lr) for lr in ("0.001", "0.002")]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in racers]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "not empty" in loser and "--force" in loser, loser
    winner = racers[[code for code, _ in results].index(0)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["optimizer"]["lr"] == (0.001 if winner is racers[0] else 0.002)  # the winner's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_during_training_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    artifacts = compile_model(
        Path(save(tiny_cnn(seed=0), tmp_path / "tiny.onnx")),
        CompileConfig(train_layers=2, batch_size=4, output_dir=tmp_path / "artifacts"),
        report=lambda message: None,
    )
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 5, 16))
    state = tmp_path / "state"
    state.mkdir()
    checkpoint = state / "ckpt"
    command = [
        sys.executable, "-m", "runtime", artifacts, "--data", tmp_path / "d.npz", "--steps", "100000",
        "--checkpoint", checkpoint, "--checkpoint-every", "1", "--log-every", "1",
    ]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for(process, checkpoint.exists)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "gfcompile: interrupted (SIGTERM); the last saved checkpoint is kept" in stderr
    assert "Traceback" not in stderr
    assert not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    resumed = subprocess.run(
        list(map(str, [*command[:6], "--steps", "1", "--checkpoint", checkpoint])),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
