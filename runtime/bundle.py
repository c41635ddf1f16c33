"""Device bundles: verified against what the device trusts, before any of their files is parsed.

A bundle (written by `gfcompile bundle`) holds data only: the training, eval and optimizer
models, the initial checkpoint, `manifest.json`, a README, for artifacts compiled with
`--feature-cache` the prefix model and the tail's artifacts folder, `SHA256SUMS` (the sha256 of
every one of those files by its path, the manifests included) and, when signed, `SHA256SUMS.sig`
(Ed25519 over SHA256SUMS).
The code that checks it is the installed runtime (`pip install gfcompile-runtime`), never the
bundle: nothing in a bundle is imported, and the runner never puts the bundle's folder on the
import path. A bundle is refused when a listed file is missing or differs, when it holds a file
that SHA256SUMS does not list (a `numpy.py`, a `runtime/` folder), and with `--trusted-key` when
the signature is missing or does not match. The chain is signature -> SHA256SUMS -> manifest and
models, so an edited learning rate or a re-hashed poisoned checkpoint fails before ORT loads a byte.

The only files the runner itself adds to a bundle are its default training state:
`trained_checkpoint` and that checkpoint's side files (temporary file, momentum buffers), and
with `--cache-features` the feature cache beside it, `trained_checkpoint.features/` (unless
`--checkpoint` or `--cache-dir` put them elsewhere, as a read-only bundle needs).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from . import checkpoints, signing
from .errors import RunError
from .feature_cache import CachedTrainer, CacheSettings, default_directory
from .trainer import DEFAULT_MODELS, MANIFEST, Trainer, load_manifest, model_files, sha256_file

INITIAL_CHECKPOINT = "checkpoint"
CHECKSUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
TRAINED_CHECKPOINT = "trained_checkpoint"
MAX_CHECKSUMS_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1024
# What `Trainer.save(BUNDLE/trained_checkpoint)` writes: the checkpoint, its record, momentum buffers, temporaries.
DEVICE_STATE = checkpoints.companion_files(TRAINED_CHECKPOINT)
# The default feature cache folder (beside trained_checkpoint): device state too, never listed; it
# is checked by its own key and content hash (runtime/feature_cache.py) and nothing in it is imported.
DEVICE_CACHE = default_directory(Path(TRAINED_CHECKPOINT)).name
# `sha256sum` format: 64 hex digits, two spaces (or space and '*'), a file name, or a path inside
# the bundle whose every part starts with a letter, digit or '_' (so never '..', never absolute).
PATH_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
CHECKSUM_LINE = re.compile(rf"^([0-9a-f]{{64}}) [ *]({PATH_PART}(?:/{PATH_PART})*)$")


def is_bundle(directory: Path) -> bool:
    return (Path(directory) / CHECKSUMS).exists()


def checksums_text(hashes: dict[str, str]) -> str:
    """SHA256SUMS as `sha256sum` writes it (so `sha256sum -c SHA256SUMS` checks a bundle too)."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))


def verify_bundle(
    directory: Path, trusted_key: Path | None = None, notice: Callable[[str], None] | None = None
) -> None:
    """Refuse a bundle unless SHA256SUMS (signed by `trusted_key`, when given) matches exactly the files present."""
    directory = Path(directory)
    notice = notice or (lambda message: print(message, file=sys.stderr))
    listing = _read_capped(directory / CHECKSUMS, MAX_CHECKSUMS_BYTES)
    signature_path = directory / SIGNATURE
    unchecked = None  # what the notice says once the files check out
    if trusted_key is not None:
        if not signature_path.is_file():
            raise RunError(f"{directory}: is not signed ({SIGNATURE} missing) but --trusted-key asks for a signature")
        signing.verify(listing, _read_capped(signature_path, MAX_SIGNATURE_BYTES), Path(trusted_key), str(directory))
    elif signature_path.exists():
        unchecked = f"{directory} is signed, but no --trusted-key was given: the signature is not checked"
    else:
        unchecked = (
            f"{directory} is not signed: its files match {CHECKSUMS}, but nothing proves who made it "
            "(sign with `gfcompile bundle --sign-key`, check with `gftrain --trusted-key`)"
        )
    expected = _parse_checksums(listing, directory)
    if MANIFEST not in expected:
        raise RunError(f"{directory}: {CHECKSUMS} does not list {MANIFEST}; copy the whole bundle again")
    _refuse_unlisted(directory, expected)
    for name, digest in expected.items():
        path = directory / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise RunError(f"{directory}: {name} is not a regular file")
        if not path.is_file():
            raise RunError(f"{directory}: {name} is missing; copy the whole bundle again")
        if sha256_file(path) != digest:
            hint = (
                "; train into a separate checkpoint (gftrain --checkpoint), the shipped one must stay as it was"
                if name == INITIAL_CHECKPOINT
                else ""
            )
            raise RunError(f"{directory}: {name} does not match its sha256 in {CHECKSUMS} (corrupted or changed){hint}")
    if unchecked is not None:
        notice(f"gfcompile: notice: {unchecked}")


def _refuse_unlisted(directory: Path, expected: dict[str, str]) -> None:
    """Refuse any entry that SHA256SUMS does not list: a file, or a folder that holds no listed file.

    Listed folders (the feature cache's tail) are walked too; the device's own state (its
    checkpoint files and default feature cache, at the top) is the one exception.
    """
    folders = {parent.as_posix() for name in expected for parent in PurePosixPath(name).parents} - {"."}
    pending = [directory]
    while pending:
        folder = pending.pop()
        for path in sorted(folder.iterdir()):
            name = path.relative_to(directory).as_posix()
            if name in expected or name in (CHECKSUMS, SIGNATURE):
                continue  # checked against its sha256 (or the signature) next
            top = folder == directory
            if top and DEVICE_STATE.match(name) and path.is_file() and not path.is_symlink():
                continue
            if top and name == DEVICE_CACHE and path.is_dir() and not path.is_symlink():
                continue
            if name in folders and path.is_dir() and not path.is_symlink():
                pending.append(path)
                continue
            kind = "folder" if path.is_dir() else "file"
            raise RunError(
                f"{directory}: the {kind} {name} is not listed in {CHECKSUMS}; a bundle holds only the files it "
                "lists (remove it, or copy the bundle again)"
            )


def open_trainer(
    directory: Path,
    checkpoint: Path | None = None,
    lr: float | None = None,
    trusted_key: Path | None = None,
    cache: CacheSettings | None = None,
) -> Trainer | CachedTrainer:
    """Verify the bundle (or the artifacts' hashes), then load it; nothing is parsed before the checks.

    With `cache`, the trainer trains the tail on cached prefix features (runtime/feature_cache.py).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RunError(f"{directory}: no such artifacts folder or bundle")
    if is_bundle(directory):
        verify_bundle(directory, trusted_key)
    elif trusted_key is not None:
        raise RunError(f"{directory}: not a signed bundle ({CHECKSUMS} missing); --trusted-key needs one")
    manifest = load_manifest(directory, verify=False)
    if "bundle" in manifest and not is_bundle(directory):
        raise RunError(f"{directory}: a bundle without {CHECKSUMS} (made by an older gfcompile?); bundle it again")
    if cache is None:
        return Trainer(directory, checkpoint=checkpoint, lr=lr)
    if "bundle" in manifest and not manifest.get("feature_cache"):
        raise RunError(
            f"{directory}: this bundle has no frozen-prefix split for --cache-features; compile with "
            "gfcompile --feature-cache and bundle again"
        )
    return CachedTrainer(directory, checkpoint, lr, cache)


def check_inference_model(path: Path, trainer: Trainer, x: np.ndarray, y: np.ndarray, tolerance: float = 1e-4) -> float:
    """Load an exported inference model in a plain InferenceSession and compare it with the eval model.

    Returns the largest absolute difference of the first output; raises when it exceeds `tolerance`
    (relative to the output's scale) or when onnxruntime cannot run the file.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (exported,) = session.run(None, {session.get_inputs()[0].name: x})[:1]
    except Exception as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path}: the exported inference model does not run in onnxruntime ({message})") from None
    _, reference = trainer.outputs(x, y)
    worst = float(np.abs(np.asarray(exported) - reference).max())
    scale = max(float(np.abs(reference).max()), 1.0)
    if worst > tolerance * scale:
        raise RunError(f"{path}: the exported model disagrees with the trained eval model (max |diff| {worst:.3g})")
    return worst


def _read_capped(path: Path, limit: int) -> bytes:
    return signing.read_capped(path, limit, "cannot read it", f"larger than {limit} bytes; not a bundle's {path.name}")


def _parse_checksums(listing: bytes, directory: Path) -> dict[str, str]:
    expected: dict[str, str] = {}
    try:
        lines = listing.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise RunError(f"{directory}: {CHECKSUMS} is not a sha256sum listing (not ASCII)") from None
    for number, line in enumerate(lines, 1):
        match = CHECKSUM_LINE.match(line)
        if not match:
            raise RunError(f"{directory}: {CHECKSUMS} line {number} is not '<sha256>  <file name>'")
        digest, name = match.groups()
        if name in expected or name in (CHECKSUMS, SIGNATURE):
            raise RunError(f"{directory}: {CHECKSUMS} lists {name} twice or lists itself")
        expected[name] = digest
    return expected


__all__ = [
    "CHECKSUMS",
    "DEFAULT_MODELS",
    "INITIAL_CHECKPOINT",
    "MANIFEST",
    "SIGNATURE",
    "check_inference_model",
    "checksums_text",
    "model_files",
    "open_trainer",
    "verify_bundle",
]
