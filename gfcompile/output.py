"""Writing artifacts: a staging directory renamed into place, and the manifest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx

from runtime.trainer import sha256_file

from .errors import GfError

MANIFEST = "manifest.json"
MODEL_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")


def check_output_dir(output_dir: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory unless asked, before doing any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise GfError(f"{output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise GfError(f"{output_dir}: directory is not empty; pass --force to replace it")


@contextlib.contextmanager
def staging_directory(output_dir: Path) -> Iterator[Path]:
    """A sibling temp dir that is removed on any failure, so no half-written output remains."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        # A Ctrl-C between creating the folder and knowing its name would leak it.
        with _sigint_deferred():
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
        yield staging
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, output_dir: Path) -> None:
    """Move the finished staging dir into place; an old output is swapped out, then deleted.

    Ctrl-C is held back during the two renames: between them the target would be missing.
    """
    output_dir = output_dir.resolve()
    retired = None
    staging.chmod(0o755)  # mkdtemp makes it owner-only; artifacts are meant to be shared
    with _sigint_deferred():
        if output_dir.exists():
            retired = output_dir.with_name(f".{output_dir.name}.retired-{os.getpid()}")
            os.replace(output_dir, retired)
        os.replace(staging, output_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Block SIGINT (delivered once the block ends) where signal masks exist, in the main thread."""
    can_block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not can_block:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def file_hashes(directory: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            hashes[str(path.relative_to(directory))] = sha256_file(path)
    return hashes


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {**manifest, "files": file_hashes(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
