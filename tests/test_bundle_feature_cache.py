"""Device bundles carry the frozen-prefix split: `gftrain BUNDLE --cache-features` (issue 16).

The references are the compiled folder's own runs: N SGD steps through the bundle's cache end at
the weights that gftrain gives on the folder with and without the cache (1e-6; SGD, as in
tests/test_feature_cache.py, where AdamW's first steps turn rounding into 1e-5). The portable
backend runs in a child where onnxruntime.training, onnx and torch cannot be imported, as on a
plain-onnxruntime device. The prefix model and the tail's files are covered by SHA256SUMS (and the
signature) like every other file: altered, removed or added, the bundle is refused before anything
loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gfcompile.bundle import make_bundle
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.__main__ import main
from runtime.bundle import open_trainer, verify_bundle
from runtime.data import load_data
from runtime.feature_cache import CachedTrainer, CacheSettings
from runtime.manifest import read_manifest
from runtime.portable import PortableTrainer
from runtime.trainer import Trainer
from tests.test_bundle_trust import _key_pair as key_pair
from tests.test_bundle_trust import refused
from tests.tiny_models import save, tiny_cnn
from tests.zoo_helpers import ZOO_CASES, export_case

ROOT = Path(__file__).resolve().parents[1]
CASE = dataclasses.replace(ZOO_CASES["mobilenet_v2"], input_shape=(3, 64, 64))
BATCH = 2
STEPS = 5
OPTIMIZER = {"optimizer": "sgd", "lr": 0.005, "momentum": 0.9}
# A child process as a plain-onnxruntime device: the portable backend, no onnx to join models with.
PORTABLE_DEVICE = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnx_graphsurgeon", "gfcompile", "passes") or name.startswith(
            "onnxruntime.training"
        ):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
from runtime.__main__ import main
from runtime.portable import training_build_installed
code = main(sys.argv[1:])
print("TRAINING_BUILD", training_build_installed())  # False: Trainer(...) is the PortableTrainer
raise SystemExit(code)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bundle_cache")
    _, model = export_case(CASE, tmp)
    config = CompileConfig(
        filter_layers=2, train_layers=4, batch_size=BATCH, output_dir=tmp / "artifacts", feature_cache=True, **OPTIMIZER
    )
    artifacts = compile_model(model, config, report=lambda message: None)
    rng = np.random.default_rng(0)
    data = tmp / "data.npz"
    np.savez(data, x=rng.standard_normal((7, *CASE.input_shape)).astype(np.float32), y=rng.integers(0, 10, 7))
    private, public = key_pair(tmp, "signer")
    return {
        "tmp": tmp,
        "artifacts": artifacts,
        "data": data,
        "bundle": make_bundle(artifacts, tmp / "bundle"),
        "signed": make_bundle(artifacts, tmp / "signed", sign_key=private),
        "key": public,
    }


def gftrain(target: Path, data: Path, *flags: str | Path) -> subprocess.CompletedProcess:
    """`gftrain TARGET --data DATA FLAGS` in this process (the training build); its one-line errors and results."""
    args = [str(target), "--data", str(data), "--log-every", "0", *map(str, flags)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def gftrain_child(target: Path, data: Path, *flags: str | Path, portable: bool = False) -> subprocess.CompletedProcess:
    """The same in a child, whose progress lines are all captured; `portable`: one that cannot import the
    training build (nor onnx, torch or gfcompile), as on a plain-onnxruntime device."""
    args = [str(target), "--data", str(data), "--log-every", "0", *map(str, flags)]
    script = ["-c", PORTABLE_DEVICE] if portable else ["-I", "-m", "runtime"]
    return subprocess.run([sys.executable, *script, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)


def trained(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def current_weights(trainer: Trainer) -> dict[str, np.ndarray]:
    if isinstance(trainer, PortableTrainer):
        return trainer.parameters()
    return {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}


def weights(artifacts: Path, checkpoint: Path, backend=Trainer) -> dict[str, np.ndarray]:
    return current_weights(backend(artifacts, checkpoint=checkpoint))


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected) and expected
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_bundle_carries_the_split_under_sha256sums(world: dict) -> None:
    bundle, artifacts = world["bundle"], world["artifacts"]
    split = read_manifest(bundle).feature_cache
    assert split == read_manifest(artifacts).feature_cache
    assert (bundle / split.prefix_model).read_bytes() == (artifacts / split.prefix_model).read_bytes()
    tail = read_manifest(bundle / split.tail)  # the tail's own manifest, as the runtime reads it
    assert tail.bundle is not None and tail.plan == read_manifest(artifacts / split.tail).plan
    # SHA256SUMS lists every file by its path, the tail's manifest included, and sha256sum -c agrees.
    present = {
        path.relative_to(bundle).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in bundle.rglob("*")
        if path.is_file() and path.name != "SHA256SUMS"
    }
    listed = dict(reversed(line.split("  ")) for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert listed == present
    assert {f"{split.tail}/manifest.json", f"{split.tail}/training_model.onnx", split.prefix_model} <= set(listed)
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
    assert "--cache-features" in (bundle / "README.md").read_text()
    verify_bundle(bundle, notice=lambda message: None)


def test_gftrain_bundle_through_the_cache_matches_the_folder_with_and_without_it(world: dict, tmp_path: Path) -> None:
    """Train, resume (the cache reused) and export from a copy of the bundle; the folder's runs are the reference."""
    bundle = shutil.copytree(world["bundle"], tmp_path / "device")
    data = world["data"]
    first = trained(gftrain_child(bundle, data, "--steps", "3", "--cache-features"))
    # The default cache lives beside the default checkpoint, inside the bundle, and the next run accepts it.
    assert f"feature cache: building {bundle / 'trained_checkpoint.features'}" in first.stderr
    export = tmp_path / "m.onnx"
    resumed = trained(gftrain_child(bundle, data, "--steps", str(STEPS), "--cache-features", "--export", export))
    assert "resuming from" in resumed.stderr and "feature cache: building" not in resumed.stderr
    assert "matches the trained eval model" in resumed.stdout and export.is_file()

    # gftrain's data order is fit's with seed 0: the folder, through the cache and the whole graph.
    artifacts = world["artifacts"]
    samples = load_data(data, read_manifest(artifacts).to_json())
    cached = CachedTrainer(artifacts, settings=CacheSettings(tmp_path / "folder.features"))
    cached.fit(samples, STEPS, seed=0, log_every=0)
    whole = Trainer(artifacts)
    whole.fit(samples, STEPS, seed=0, log_every=0)
    actual = weights(bundle / "feature_tail", bundle / "trained_checkpoint")
    assert_same(actual, current_weights(cached.tail))
    assert_same(actual, current_weights(whole))
    initial = weights(bundle / "feature_tail", bundle / "feature_tail" / "checkpoint")
    assert any(not np.array_equal(actual[name], value) for name, value in initial.items())
    verify_bundle(bundle, notice=lambda message: None)  # the shipped files are as they were


def test_portable_backend_trains_a_bundle_through_the_cache(world: dict, tmp_path: Path) -> None:
    bundle, data, checkpoint = world["bundle"], world["data"], tmp_path / "ckpt"
    flags = ["--cache-features", "--checkpoint", checkpoint]
    first = trained(gftrain_child(bundle, data, "--steps", "3", *flags, portable=True))
    assert "TRAINING_BUILD False" in first.stdout
    assert f"feature cache: building {tmp_path / 'ckpt.features'}" in first.stderr
    export = tmp_path / "m.onnx"
    resumed = trained(gftrain_child(bundle, data, "--steps", str(STEPS), *flags, "--export", export, portable=True))
    assert "resuming from" in resumed.stderr and "feature cache: building" not in resumed.stderr
    assert "matches the trained eval model" in resumed.stdout and export.is_file()
    # The reference: the whole graph's portable train step on the compiled folder, uncached.
    whole = PortableTrainer(world["artifacts"])
    whole.fit(load_data(data, whole.manifest), STEPS, seed=0, log_every=0)
    assert_same(weights(bundle / "feature_tail", checkpoint, PortableTrainer), whole.parameters())


def test_ort_format_bundle_trains_the_tail_from_ort_models(world: dict, tmp_path: Path) -> None:
    ort_bundle = make_bundle(world["artifacts"], tmp_path / "ort", ort_format=True)
    tail = read_manifest(ort_bundle / "feature_tail")
    assert tail.model_files()["training"] == "training_model.ort"
    assert not (ort_bundle / "feature_tail" / "training_model.onnx").exists()
    data = load_data(world["data"], read_manifest(ort_bundle).to_json())
    runs = []
    for bundle in (ort_bundle, world["bundle"]):
        trainer = open_trainer(bundle, cache=CacheSettings(tmp_path / f"{bundle.name}.features"))
        trainer.fit(data, 3, seed=1, log_every=0)
        runs.append(current_weights(trainer.tail))
    assert_same(*runs)


def tamper(bundle: Path, target: Path, change) -> Path:
    device = shutil.copytree(bundle, target)
    change(device)
    return device


def flip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def rehash(bundle: Path) -> None:
    """What an attacker without the key can do: recompute SHA256SUMS after an edit."""
    names = [line.split("  ")[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()]
    (bundle / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((bundle / name).read_bytes()).hexdigest()}  {name}\n" for name in names)
    )


def test_an_altered_removed_or_added_split_file_is_refused_before_anything_loads(world: dict, tmp_path: Path) -> None:
    def edit_tail_lr(device: Path) -> None:
        manifest = json.loads((device / "feature_tail" / "manifest.json").read_text())
        manifest["optimizer"]["lr"] = 0.9
        (device / "feature_tail" / "manifest.json").write_text(json.dumps(manifest))

    def planted_folder(device: Path) -> None:
        (device / "feature_tail" / "runtime").mkdir()
        (device / "feature_tail" / "runtime" / "__init__.py").write_text("raise SystemExit(99)\n")

    def linked_tail(device: Path) -> None:
        shutil.rmtree(device / "feature_tail")
        (device / "feature_tail").symlink_to(world["artifacts"] / "feature_tail")

    cases = {
        "prefix": (lambda d: flip(d / "prefix_model.onnx"), "prefix_model.onnx does not match its sha256"),
        "tail_model": (
            lambda d: flip(d / "feature_tail" / "training_model.onnx"),
            "feature_tail/training_model.onnx does not match its sha256",
        ),
        "tail_manifest": (edit_tail_lr, "feature_tail/manifest.json does not match its sha256"),
        "tail_removed": (lambda d: (d / "feature_tail" / "checkpoint").unlink(), "feature_tail/checkpoint is missing"),
        "tail_added": (
            lambda d: (d / "feature_tail" / "numpy.py").write_text("raise SystemExit(99)\n"),
            "the file feature_tail/numpy.py is not listed in SHA256SUMS",
        ),
        "tail_folder_added": (planted_folder, "the folder feature_tail/runtime is not listed in SHA256SUMS"),
        "tail_linked": (linked_tail, "the folder feature_tail is not listed in SHA256SUMS"),
    }
    for name, (change, message) in cases.items():
        device = tamper(world["bundle"], tmp_path / name, change)
        refused(gftrain(device, world["data"], "--steps", "1", "--cache-features"), message)
        # Nothing ran: no features were computed, no checkpoint was written.
        assert not (device / "trained_checkpoint.features").exists(), name
        assert not (device / "trained_checkpoint").exists(), name

    # Re-hashed without the key, the altered prefix is consistent with SHA256SUMS but not with the signature.
    def forged(device: Path) -> None:
        flip(device / "prefix_model.onnx")
        rehash(device)

    device = tamper(world["signed"], tmp_path / "forged", forged)
    refused(
        gftrain(device, world["data"], "--cache-features", "--trusted-key", world["key"]), "signature does not match"
    )
    assert not (device / "trained_checkpoint.features").exists()


def test_a_signed_bundle_with_the_split_trains_with_its_key(world: dict, tmp_path: Path) -> None:
    device = shutil.copytree(world["signed"], tmp_path / "signed")
    result = trained(gftrain(device, world["data"], "--steps", "2", "--cache-features", "--trusted-key", world["key"]))
    assert "notice" not in result.stderr and "step 2; checkpoint" in result.stdout
    assert (device / "trained_checkpoint.features" / "features.bin").is_file()


def test_a_bundle_without_the_split_is_refused_in_one_line(world: dict, tmp_path: Path) -> None:
    artifacts = compile_model(
        Path(save(tiny_cnn(batch=BATCH), tmp_path / "tiny.onnx")),
        CompileConfig(train_layers=2, batch_size=BATCH, output_dir=tmp_path / "plain"),
        report=lambda message: None,
    )
    bundle = make_bundle(artifacts, tmp_path / "bundle")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((4, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 5, 4))
    result = gftrain(bundle, tmp_path / "data.npz", "--steps", "1", "--cache-features")
    refused(result, "no frozen-prefix split", "compile with gfcompile --feature-cache and bundle again")
    assert not (bundle / "trained_checkpoint").exists()
