"""Checkpoint integrity: every checkpoint the trainer writes carries its sha256, checked before loading.

Beside `CKPT` the trainer keeps `CKPT.sha256`, a small JSON record of the checkpoint's sha256 (and
of the momentum buffers that belong to it). A checkpoint whose bytes do not match its record (a
flipped bit, a truncated copy, a swapped file) is refused before onnxruntime reads a weight.

Replacing a checkpoint must survive a crash at any instant, so the record moves in two steps:

    1. record accepts {old, new}    (written to a temporary file, fsync'd, renamed)
    2. checkpoint: new replaces old (already fsync'd under its temporary name, renamed)
    3. record accepts {new}

Whichever checkpoint a crash leaves under `CKPT`, the record on disk accepts it; a corrupted one
matches neither hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError

RECORD_SUFFIX = ".sha256"
RECORD_FORMAT = 1
MAX_RECORD_BYTES = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint version the record accepts, and the momentum buffers written for it (if any)."""

    sha256: str
    step: int
    momentum_file: str | None = None
    momentum_sha256: str | None = None

    def to_json(self) -> dict:
        entry: dict = {"sha256": self.sha256, "step": self.step}
        if self.momentum_file is not None:
            entry["momentum"] = {"file": self.momentum_file, "sha256": self.momentum_sha256}
        return entry


def momentum_path(checkpoint: Path, step: int) -> Path:
    """Where the numpy SGD momentum buffers of `step` live, beside the checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name}.momentum-{step}.npz")


def companion_files(checkpoint_name: str) -> re.Pattern[str]:
    """Every name that saving `checkpoint_name` writes in its folder: itself, its record, momentum, temporaries."""
    name = re.escape(checkpoint_name)
    return re.compile(rf"^{name}(\.tmp|{re.escape(RECORD_SUFFIX)}(\.tmp)?|\.momentum-\d+\.npz(\.tmp\.npz)?)?$")


def record_path(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + RECORD_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(checkpoint: Path) -> CheckpointEntry:
    """The record entry that `checkpoint`'s bytes match; a one-line RunError when there is none."""
    checkpoint = Path(checkpoint)
    record = record_path(checkpoint)
    if not record.is_file():
        raise RunError(
            f"{checkpoint}: cannot load checkpoint without its integrity record {record.name} "
            "(the trainer writes one beside every checkpoint; copy both)"
        )
    entries = _read_record(record)
    actual = sha256_file(checkpoint)
    for entry in entries:
        if entry.sha256 == actual:
            return entry
    raise RunError(
        f"{checkpoint}: does not match the sha256 in {record.name} (corrupted or altered); refusing to load its weights"
    )


def verify_momentum(checkpoint: Path, entry: CheckpointEntry) -> Path | None:
    """The momentum buffer file recorded with `entry`, checked against its sha256 (None when there is none)."""
    if entry.momentum_file is None:
        return None
    path = Path(checkpoint).with_name(entry.momentum_file)
    if not path.is_file():
        raise RunError(f"{path}: missing; the momentum buffers of step {entry.step} are needed to resume SGD exactly")
    if sha256_file(path) != entry.momentum_sha256:
        raise RunError(f"{path}: does not match the sha256 in {record_path(checkpoint).name} (corrupted or altered)")
    return path


def replace(checkpoint: Path, written: Path, entry: CheckpointEntry) -> None:
    """Move the fsync'd `written` file to `checkpoint`, keeping the record valid at every instant."""
    checkpoint = Path(checkpoint)
    record = record_path(checkpoint)
    current: list[CheckpointEntry] = []
    if checkpoint.is_file() and record.is_file():
        try:
            current = [verify(checkpoint)]
        except RunError:
            current = []  # the file under that name was not intact; it is being replaced anyway
    _write_record(record, [*current, entry])
    os.replace(written, checkpoint)
    _fsync_directory(checkpoint.parent)
    _write_record(record, [entry])


def _read_record(record: Path) -> list[CheckpointEntry]:
    problem = f"{record}: not a checkpoint record (corrupted?)"
    try:
        with open(record, "rb") as handle:
            text = handle.read(MAX_RECORD_BYTES + 1)
        if len(text) > MAX_RECORD_BYTES:
            raise RunError(problem)
        data = json.loads(text)
    except OSError as exc:
        raise RunError(f"{record}: cannot read the checkpoint record ({exc.strerror})") from None
    except (ValueError, RecursionError):
        raise RunError(problem) from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("accepted"), list):
        raise RunError(problem)
    entries = []
    for item in data["accepted"]:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("sha256"), str)
            or not _SHA256.fullmatch(item["sha256"])
        ):
            raise RunError(problem)
        step = item.get("step")
        if type(step) is not int or step < 0:
            raise RunError(problem)
        momentum = item.get("momentum")
        if momentum is None:
            entries.append(CheckpointEntry(item["sha256"], step))
            continue
        name, digest = (momentum.get("file"), momentum.get("sha256")) if isinstance(momentum, dict) else (None, None)
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise RunError(problem)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise RunError(problem)
        entries.append(CheckpointEntry(item["sha256"], step, name, digest))
    return entries


def _write_record(record: Path, entries: list[CheckpointEntry]) -> None:
    data = {"format": RECORD_FORMAT, "accepted": [entry.to_json() for entry in entries]}
    temporary = record.with_name(record.name + ".tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(json.dumps(data, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, record)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(record.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the renames themselves durable (where directories can be opened; not on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
