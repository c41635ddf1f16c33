"""Checkpoint files in the safetensors format, through the `safetensors` package.

The package is small (a Rust core with abi3 wheels for aarch64 and x86_64, Python 3.8+) and the
files it writes load in PyTorch, JavaScript and everywhere else safetensors is read. These two
functions add what the runtime needs on top: a durable write (fsync before the caller's atomic
rename) and one-line errors naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from .errors import RunError


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` to `path` and fsync it (not atomic; see PortableTrainer.save)."""
    try:
        data = save({name: np.ascontiguousarray(array) for name, array in tensors.items()}, metadata=dict(metadata))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise RunError(f"{path}: cannot store these tensors in safetensors ({exc})") from None
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; RunError naming the file if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: cannot read checkpoint (no such file)")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path}: not a valid safetensors checkpoint ({first_line})") from None
    return tensors, metadata
