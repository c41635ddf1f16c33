"""Checkpoint integrity and the training run's outputs (issue 15, V4, V5 and V9).

Every checkpoint the trainer writes has a sha256 record beside it, checked before a weight is
read; a checkpoint of the other optimizer is refused; a killed `gfcompile train` resumes to the
weights of a run that was never interrupted; outputs that cannot be written, or would overwrite
the artifacts, are refused before the first step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gfcompile.cli import main as gfcompile_main
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime import checkpoints, training_run
from runtime.__main__ import main as gftrain_main
from runtime.data import load_data
from runtime.errors import RunError
from runtime.ort_training import training_api
from runtime.trainer import Trainer
from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("integrity")
    model = save(tiny_cnn(seed=0), tmp / "tiny.onnx")
    e: dict = {"tmp": tmp}
    for optimizer in ("adamw", "sgd"):
        e[optimizer] = compile_model(
            Path(model),
            CompileConfig(train_layers=2, batch_size=BATCH, optimizer=optimizer, lr=0.01, output_dir=tmp / optimizer),
            report=lambda message: None,
        )
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 5, 16))
    e["data"] = tmp / "data.npz"
    return e


def _cli(capsys, *argv, runner=gfcompile_main) -> tuple[int, list[str]]:
    code = runner([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("gfcompile: error:")]


def _train(env: dict, optimizer: str, save_to: Path, steps: int = 3, *flags) -> None:
    code = gfcompile_main(
        list(map(str, ["train", env[optimizer], "--data", env["data"], "--steps", steps, "--save", save_to, *flags]))
    )
    assert code == 0


def _weights(artifacts: Path, checkpoint: Path) -> dict[str, np.ndarray]:
    trainer = Trainer(artifacts, checkpoint=checkpoint)
    return {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


def _sha(path: Path) -> str:
    return checkpoints.sha256_file(path)


# ---- V4: a flipped bit


def _flip_a_weight_bit(checkpoint: Path, weight: np.ndarray) -> None:
    """Flip the top exponent bit of the first float of `weight` where the checkpoint stores it."""
    blob = bytearray(checkpoint.read_bytes())
    at = bytes(blob).find(weight.astype(np.float32).tobytes())
    assert at >= 0, "the weight's bytes are not stored contiguously"
    blob[at + 3] ^= 0x40
    checkpoint.write_bytes(bytes(blob))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_flipped_bit_in_a_trained_checkpoint_is_refused(env: dict, tmp_path: Path, optimizer: str, capsys) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, optimizer, checkpoint)
    bias = _weights(env[optimizer], checkpoint)["fc.bias"]
    _flip_a_weight_bit(checkpoint, bias)
    # Without the record the corruption is silent: onnxruntime loads it and the bias is now huge.
    state = training_api().CheckpointState.load_checkpoint(str(checkpoint))
    corrupted = state.parameters["fc.bias"].data
    assert np.isfinite(corrupted).all() and not np.array_equal(corrupted, bias)
    flipped = checkpoint.read_bytes()

    for argv, runner in (
        (["train", env[optimizer], "--data", env["data"], "--save", checkpoint, "--resume"], gfcompile_main),
        (["eval", env[optimizer], "--data", env["data"], "--checkpoint", checkpoint], gfcompile_main),
        ([env[optimizer], "--data", env["data"], "--checkpoint", checkpoint], gftrain_main),
    ):
        code, errors = _cli(capsys, *argv, runner=runner)
        assert code == 2 and len(errors) == 1, errors
        assert "does not match the sha256 in ckpt.sha256" in errors[0]
    assert checkpoint.read_bytes() == flipped  # refused, not overwritten


def test_missing_or_corrupted_record_is_refused(env: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, "adamw", checkpoint)
    record = checkpoints.record_path(checkpoint)
    record.write_text(record.read_text().replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(RunError, match="not a checkpoint record"):
        Trainer(env["adamw"], checkpoint=checkpoint)
    record.unlink()
    with pytest.raises(RunError, match="without its integrity record ckpt.sha256"):
        Trainer(env["adamw"], checkpoint=checkpoint)


def test_flipped_momentum_buffer_is_refused(env: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, "sgd", checkpoint)
    (momentum,) = tmp_path.glob("ckpt.momentum-*.npz")
    blob = bytearray(momentum.read_bytes())
    blob[-200] ^= 0x01
    momentum.write_bytes(bytes(blob))
    with pytest.raises(RunError, match=f"{momentum.name}: does not match the sha256"):
        Trainer(env["sgd"], checkpoint=checkpoint)


def test_interrupted_replacement_keeps_the_previous_checkpoint_loadable(env: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, "adamw", checkpoint)
    before = _weights(env["adamw"], checkpoint)
    # The new file vanishes between the record's first step and the rename (as in a crash there):
    # the record then accepts both versions, and the old checkpoint still loads.
    entry = checkpoints.CheckpointEntry("ab" * 32, 99)
    with pytest.raises(FileNotFoundError):
        checkpoints.replace(checkpoint, tmp_path / "never_written", entry)
    record = json.loads(checkpoints.record_path(checkpoint).read_text())
    assert [item["sha256"] for item in record["accepted"]] == [_sha(checkpoint), "ab" * 32]
    after = _weights(env["adamw"], checkpoint)
    assert all(np.array_equal(after[name], value) for name, value in before.items())


# ---- V5: a checkpoint of the other optimizer


@pytest.mark.parametrize(("trained_with", "loaded_with"), [("sgd", "adamw"), ("adamw", "sgd")])
def test_checkpoint_of_the_other_optimizer_is_one_line(
    env: dict, tmp_path: Path, trained_with: str, loaded_with: str, capsys
) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, trained_with, checkpoint)
    out = tmp_path / "out"
    for argv, runner in (
        (["train", env[loaded_with], "--data", env["data"], "--checkpoint", checkpoint, "--save", out], gfcompile_main),
        ([env[loaded_with], "--data", env["data"], "--checkpoint", checkpoint], gftrain_main),
    ):
        code, errors = _cli(capsys, *argv, runner=runner)
        assert code == 2 and len(errors) == 1, errors
        assert f"holds {trained_with} optimizer state" in errors[0] and f"trains with {loaded_with}" in errors[0]
    assert not out.exists()


# ---- resume equals an uninterrupted run


def _uninterrupted(env: dict, optimizer: str, steps: int, tmp_path: Path) -> dict[str, np.ndarray]:
    trainer = Trainer(env[optimizer])
    data = load_data(env["data"], trainer.manifest)
    options = training_run.RunOptions(steps=steps, log_every=0, seed=3)
    training_run.train(trainer, data, options, tmp_path / "straight", resumed=False)
    return {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_killed_train_resumes_to_the_uninterrupted_weights(env: dict, tmp_path: Path, optimizer: str) -> None:
    checkpoint = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "gfcompile", "train", env[optimizer], "--data", env["data"], "--steps", "1000000",
        "--seed", "3", "--save", checkpoint, "--checkpoint-every", "1", "--log-every", "0",
    ]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    record = checkpoints.record_path(checkpoint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if record.is_file() and json.loads(record.read_text() or "{}").get("accepted", [{}])[-1].get("step", 0) >= 3:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # as a power loss: no cleanup
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # The record names step 3 from the first step of replacing step 2's checkpoint: either may be on disk.
    killed_at = Trainer(env[optimizer], checkpoint=checkpoint).step
    assert killed_at >= 2

    # The same run, resumed with a nearer end: its start (step 0) is recorded in the checkpoint.
    target = killed_at + 5
    _train(env, optimizer, checkpoint, target, "--seed", "3", "--resume", "--log-every", "0")
    resumed = _weights(env[optimizer], checkpoint)
    assert Trainer(env[optimizer], checkpoint=checkpoint).step == target
    straight = _uninterrupted(env, optimizer, target, tmp_path)
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_rerun_without_resume_is_refused_and_restart_replaces(env: dict, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, "adamw", checkpoint, 4, "--seed", "3")
    kept = checkpoint.read_bytes()
    code, errors = _cli(capsys, "train", env["adamw"], "--data", env["data"], "--steps", "4", "--save", checkpoint)
    assert code == 2 and "--resume continues it, --restart trains again" in errors[0]
    assert checkpoint.read_bytes() == kept
    # --resume of a finished run trains nothing more; a longer --steps continues it.
    finished = _weights(env["adamw"], checkpoint)
    _train(env, "adamw", checkpoint, 4, "--seed", "3", "--resume")
    assert Trainer(env["adamw"], checkpoint=checkpoint).step == 4
    assert all(np.array_equal(_weights(env["adamw"], checkpoint)[name], v) for name, v in finished.items())
    _train(env, "adamw", checkpoint, 9, "--seed", "3", "--resume")
    continued = _weights(env["adamw"], checkpoint)
    straight = _uninterrupted(env, "adamw", 9, tmp_path)
    assert all(np.array_equal(continued[name], value) for name, value in straight.items())
    _train(env, "adamw", checkpoint, 2, "--restart")
    assert Trainer(env["adamw"], checkpoint=checkpoint).step == 2


# ---- V9 and V5: outputs refused before the first step


@pytest.mark.parametrize("name", ["manifest.json", "eval_model.onnx", "checkpoint", "training_model.onnx"])
def test_save_onto_an_artifacts_file_is_refused(env: dict, name: str, capsys) -> None:
    artifacts = env["adamw"]
    before = {p.name: p.read_bytes() for p in artifacts.iterdir()}
    for flags in ([], ["--restart"], ["--resume"]):
        code, errors = _cli(
            capsys, "train", artifacts, "--data", env["data"], "--steps", "2", "--save", artifacts / name, *flags
        )
        assert code == 2 and len(errors) == 1, (name, flags, errors)
    assert {p.name: p.read_bytes() for p in artifacts.iterdir()} == before


def test_save_path_checks_name_the_artifacts_file(env: dict) -> None:
    trainer = Trainer(env["adamw"])
    with pytest.raises(RunError, match="would overwrite manifest.json of the artifacts"):
        trainer.check_save_path(env["adamw"] / "manifest.json")
    with pytest.raises(RunError, match="compiled initial checkpoint"):
        trainer.check_save_path(env["adamw"] / "checkpoint")


@pytest.mark.parametrize(
    ("option", "path", "message"),
    [
        ("--save", "a_file/ckpt", "a_file is a file, not a folder"),
        ("--save", "a_dir", "is a directory; give a file name for the checkpoint"),
        ("--export", "missing_dir/model.onnx", "the folder"),
        ("--export", "a_dir", "is a directory; give a file name for the inference model"),
        ("--export", "ckpt", "is also the checkpoint path"),
    ],
)
def test_unwritable_outputs_are_refused_before_training(
    env: dict, tmp_path: Path, option: str, path: str, message: str, capsys
) -> None:
    (tmp_path / "a_file").write_text("user data")
    (tmp_path / "a_dir").mkdir()
    save_to = tmp_path / "ckpt"
    argv = ["train", env["adamw"], "--data", env["data"], "--steps", "2"]
    argv += ["--save", tmp_path / path] if option == "--save" else ["--save", save_to, "--export", tmp_path / path]
    code, errors = _cli(capsys, *argv)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not save_to.exists() and not checkpoints.record_path(save_to).exists()  # no step was trained
    assert (tmp_path / "a_file").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--checkpoint-every", "-2"], "--checkpoint-every must be >= 0, got -2"),
        (["--log-every", "-1"], "--log-every must be >= 0, got -1"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "ten"], "--steps must be an integer, got 'ten'"),
    ],
)
@pytest.mark.parametrize("command", ["train", "gftrain"])
def test_invalid_numbers_are_one_line(env: dict, tmp_path: Path, argv: list, message: str, command: str, capsys):
    save_to = tmp_path / "ckpt"
    if command == "train":
        code, errors = _cli(capsys, "train", env["adamw"], "--data", env["data"], "--save", save_to, *argv)
    else:
        code, errors = _cli(
            capsys, env["adamw"], "--data", env["data"], "--checkpoint", save_to, *argv, runner=gftrain_main
        )
    assert code == 2 and errors == [f"gfcompile: error: {message}"]
    assert not save_to.exists()


def test_invalid_learning_rate_is_one_line(env: dict, tmp_path: Path, capsys) -> None:
    code, errors = _cli(capsys, "train", env["adamw"], "--data", env["data"], "--lr", "nan", "--save", tmp_path / "c")
    assert code == 2 and errors == ["gfcompile: error: --lr must be a positive number, got nan"]


def test_periodic_checkpoints_during_train(env: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    # Killed right after step 5's checkpoint, the run would resume from step 4 (every 2 steps).
    _train(env, "sgd", checkpoint, 5, "--checkpoint-every", "2")
    assert Trainer(env["sgd"], checkpoint=checkpoint).step == 5
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt", "ckpt.momentum-5.npz", "ckpt.sha256"]  # stale momentum and temporaries gone


def test_export_is_checked_and_written_atomically(env: dict, tmp_path: Path) -> None:
    import onnxruntime as ort

    checkpoint, exported = tmp_path / "ckpt", tmp_path / "model.onnx"
    _train(env, "adamw", checkpoint, 3, "--export", exported)
    trainer = Trainer(env["adamw"], checkpoint=checkpoint)
    x = np.random.default_rng(1).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    _, reference = trainer.outputs(x, np.zeros(BATCH, np.int64))
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.sha256", "model.onnx"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to stand in for a full disk")
def test_full_disk_while_saving_or_exporting_is_one_line_and_keeps_the_checkpoint(
    env: dict, tmp_path: Path, capsys
) -> None:
    checkpoint = tmp_path / "ckpt"
    _train(env, "adamw", checkpoint, 3)
    kept = checkpoint.read_bytes()
    # Writes to /dev/full fail with ENOSPC: the temporary file each writer uses is pointed there.
    (tmp_path / "ckpt.tmp").symlink_to("/dev/full")
    argv = ["train", env["adamw"], "--data", env["data"], "--steps", "5", "--save", checkpoint, "--resume"]
    code, errors = _cli(capsys, *argv, "--checkpoint-every", "1")
    assert code == 2 and len(errors) == 1 and "cannot write the checkpoint" in errors[0], errors
    assert checkpoint.read_bytes() == kept and Trainer(env["adamw"], checkpoint=checkpoint).step == 3

    (tmp_path / "model.onnx.tmp.onnx").symlink_to("/dev/full")
    code, errors = _cli(capsys, *argv, "--export", tmp_path / "model.onnx")
    assert code == 2 and len(errors) == 1 and "cannot write the inference model" in errors[0], errors
    assert not (tmp_path / "model.onnx").exists()
    assert Trainer(env["adamw"], checkpoint=checkpoint).step == 5  # the trained checkpoint was saved first
