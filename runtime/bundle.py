"""Device bundles: checking every shipped file, and training from ORT-format models.

A bundle (written by `gfcompile bundle`) is an artifacts folder whose manifest also has a
"bundle" entry naming the model files to load ("training_model.ort" or ".onnx", ...). Its
"files" hold the sha256 of every shipped file, the initial checkpoint included: the runtime
never writes into the shipped checkpoint (it trains into `trained_checkpoint` or the
`--checkpoint` path), so that hash stays valid and a corrupted bundle is refused before
anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import RunError
from .trainer import DEFAULT_MODELS, MANIFEST, Trainer, load_manifest, model_files, sha256_file

INITIAL_CHECKPOINT = "checkpoint"


def verify_files(directory: Path, manifest: dict) -> None:
    """Refuse a folder whose files (the shipped checkpoint included) do not match the manifest."""
    directory = Path(directory)
    files = manifest.get("files")
    if not files:
        raise RunError(f"{directory}: the manifest lists no files to verify")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise RunError(f"{directory}: {name} is missing; copy the whole bundle again")
        if sha256_file(path) != expected:
            hint = (
                "; train into a separate checkpoint (gftrain --checkpoint), the shipped one must stay as it was"
                if name == INITIAL_CHECKPOINT
                else ""
            )
            raise RunError(f"{directory}: {name} does not match its sha256 in the manifest (corrupted?){hint}")


def open_trainer(directory: Path, checkpoint: Path | None = None, lr: float | None = None) -> Trainer:
    """Verify every file, then load the artifacts or bundle (ORT-format models too)."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify=False)
    verify_files(directory, manifest)
    return Trainer(directory, checkpoint=checkpoint, lr=lr)


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


__all__ = [
    "DEFAULT_MODELS",
    "INITIAL_CHECKPOINT",
    "MANIFEST",
    "check_inference_model",
    "model_files",
    "open_trainer",
    "verify_files",
]
