"""A bundle is data that the installed runtime verifies (issue 15, V3).

Attacks, each through the real `gftrain` command: code planted in the bundle (`numpy.py`, a
`runtime/` package) never runs, from any working directory; unlisted files are refused; an edited
manifest fails its hash; a poisoned checkpoint with a re-hashed manifest and SHA256SUMS (what an
attacker without the key can do) fails the signature; the wrong key and a missing signature are
refused. The runner also installs and runs on its own (`pip install ./runtime`), with no gfcompile,
torch or onnx beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gfcompile.bundle import make_bundle
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
GFTRAIN = Path(sys.executable).with_name("gftrain")
BATCH = 4
# Planted code: if it ever runs it leaves a marker file and kills the process with a telltale code.
PLANTED = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise SystemExit(99)\n"


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("trust")
    artifacts = compile_model(
        Path(save(tiny_cnn(seed=0), tmp / "tiny.onnx")),
        CompileConfig(train_layers=2, filter_layers=1, batch_size=BATCH, lr=0.01, output_dir=tmp / "artifacts"),
        report=lambda message: None,
    )
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 5, 16))
    private, public = _key_pair(tmp, "signer")
    _, stranger = _key_pair(tmp, "stranger")
    return {
        "tmp": tmp,
        "artifacts": artifacts,
        "data": tmp / "data.npz",
        "signed": make_bundle(artifacts, tmp / "signed", sign_key=private),
        "unsigned": make_bundle(artifacts, tmp / "unsigned"),
        "key": public,
        "stranger": stranger,
    }


def gftrain(bundle: Path, data: Path, *flags: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [GFTRAIN, bundle, "--data", data, "--steps", "1", "--checkpoint-every", "0", *flags]
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


def copy(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


def rehash(bundle: Path) -> None:
    """What an attacker without the key can do: recompute every hash after an edit."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    lines = [line.split("  ")[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()]
    (bundle / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((bundle / name).read_bytes()).hexdigest()}  {name}\n" for name in lines)
    )


def refused(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def test_a_signed_bundle_trains_with_its_key_and_an_unsigned_one_with_a_notice(world: dict, tmp_path: Path) -> None:
    signed = copy(world["signed"], tmp_path / "signed")
    result = gftrain(signed, world["data"], "--trusted-key", world["key"])
    assert result.returncode == 0, result.stderr
    assert "notice" not in result.stderr and (signed / "trained_checkpoint").is_file()
    unsigned = copy(world["unsigned"], tmp_path / "unsigned")
    result = gftrain(unsigned, world["data"])
    assert result.returncode == 0, result.stderr
    assert "gfcompile: notice:" in result.stderr and "is not signed" in result.stderr
    # The signature is plain Ed25519 over SHA256SUMS: the signer's public key checks it without our code.
    key = serialization.load_pem_public_key(world["key"].read_bytes())
    key.verify((signed / "SHA256SUMS.sig").read_bytes(), (signed / "SHA256SUMS").read_bytes())


def test_planted_code_never_runs_and_unlisted_files_are_refused(world: dict, tmp_path: Path) -> None:
    marker = tmp_path / "planted-code-ran"
    for planted in ("numpy.py", "runtime/__init__.py", "runtime/__main__.py", "onnxruntime/__init__.py"):
        bundle = copy(world["unsigned"], tmp_path / planted.replace("/", "_"))
        (bundle / planted).parent.mkdir(exist_ok=True)
        (bundle / planted).write_text(PLANTED.format(marker=str(marker)))
        top = planted.split("/")[0]
        # From outside and from inside the bundle (what its old README said to do), with gftrain and python -I -m.
        for command, cwd in (
            ([GFTRAIN, bundle], ROOT),
            ([GFTRAIN, "."], bundle),
            ([sys.executable, "-I", "-m", "runtime", "."], bundle),
        ):
            argv = [*map(str, command), "--data", str(world["data"]), "--steps", "1"]
            result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)
            refused(result, f"{top} is not listed in SHA256SUMS")
            assert not marker.exists(), (planted, command)
        assert not (bundle / "trained_checkpoint").exists()


def test_a_changed_manifest_is_refused_before_anything_loads(world: dict, tmp_path: Path) -> None:
    bundle = copy(world["unsigned"], tmp_path / "lr")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["optimizer"]["lr"] == 0.01
    manifest["optimizer"]["lr"] = 0.91
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    refused(gftrain(bundle, world["data"]), "manifest.json does not match its sha256 in SHA256SUMS")
    # Re-hashed without the key: the unsigned check cannot tell, which is what signing is for.
    signed = copy(world["signed"], tmp_path / "lr_signed")
    (signed / "manifest.json").write_text((bundle / "manifest.json").read_text())
    rehash(signed)
    refused(gftrain(signed, world["data"], "--trusted-key", world["key"]), "signature does not match")


def test_a_poisoned_checkpoint_with_rehashed_lists_fails_the_signature(world: dict, tmp_path: Path) -> None:
    bundle = copy(world["signed"], tmp_path / "poisoned")
    # Garbage instead of weights: were it loaded, the error would be ORT's, not the signature's.
    (bundle / "checkpoint").write_bytes(os.urandom((bundle / "checkpoint").stat().st_size))
    rehash(bundle)
    refused(gftrain(bundle, world["data"], "--trusted-key", world["key"]), "signature does not match the trusted key")
    refused(gftrain(bundle, world["data"], "--trusted-key", world["stranger"]), "signature does not match")
    # Without --trusted-key the rehashed bundle is consistent with itself: it gets as far as ORT, with a notice.
    result = gftrain(bundle, world["data"])
    assert "is signed, but no --trusted-key was given" in result.stderr
    refused(result, "checkpoint")


def test_signature_edge_cases_are_refused(world: dict, tmp_path: Path) -> None:
    refused(gftrain(world["unsigned"], world["data"], "--trusted-key", world["key"]), "is not signed")
    refused(gftrain(world["artifacts"], world["data"], "--trusted-key", world["key"]), "not a signed bundle")
    refused(gftrain(world["signed"], world["data"], "--trusted-key", world["artifacts"] / "checkpoint"), "PEM")
    wrong_length = copy(world["signed"], tmp_path / "short_signature")
    (wrong_length / "SHA256SUMS.sig").write_bytes(b"\0" * 10)
    refused(gftrain(wrong_length, world["data"], "--trusted-key", world["key"]), "signature does not match")
    bad_listing = copy(world["unsigned"], tmp_path / "bad_listing")
    (bad_listing / "SHA256SUMS").write_text("0" * 64 + "  ../../etc/passwd\n")
    refused(gftrain(bad_listing, world["data"]), "SHA256SUMS line 1")
    result = subprocess.run(
        [sys.executable, "-m", "gfcompile", "bundle", world["artifacts"], "-o", tmp_path / "b", "--sign-key",
         world["key"]],  # a public key where the private one belongs
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    refused(result, "not a PEM private key")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_the_runtime_installs_and_verifies_on_its_own(world: dict, tmp_path: Path) -> None:
    """`pip install ./runtime[signing,training]` into a fresh venv: gftrain trains a signed bundle there,
    without gfcompile."""
    source = tmp_path / "runtime_source"  # built from a copy, so no build/ folder lands in the checkout
    shutil.copytree(ROOT / "runtime", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    env_dir = tmp_path / "device_env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-I", "-m", "pip", "install", "--quiet", f"{source}[signing,training]"],
        capture_output=True, text=True, env=clean_env, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run(
        [python, "-I", "-c", "import importlib.util as u, runtime; print(runtime.__file__); "
         "print([m for m in ('gfcompile', 'passes', 'torch', 'onnx_graphsurgeon', 'PIL') if u.find_spec(m)])"],
        capture_output=True, text=True, env=clean_env, cwd=tmp_path,
    )  # fmt: skip
    location, importable = probe.stdout.split("\n", 1)  # (onnx comes with onnxruntime-training itself)
    assert Path(location).is_relative_to(env_dir) and importable.strip() == "[]", probe.stdout + probe.stderr
    bundle = copy(world["signed"], tmp_path / "bundle")
    command = [env_dir / "bin" / "gftrain", bundle, "--data", world["data"], "--steps", "2", "--trusted-key"]
    result = subprocess.run(
        list(map(str, [*command, world["key"]])), capture_output=True, text=True, env=clean_env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "step 2; checkpoint" in result.stdout
    refused(
        subprocess.run(
            list(map(str, [*command, world["stranger"]])), capture_output=True, text=True, env=clean_env, cwd=tmp_path
        ),
        "signature does not match",
    )
