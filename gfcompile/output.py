"""Writing outputs: a staging directory renamed into place, single files renamed into place, and the manifest.

Publishing is atomic and never replaces what it was not asked to: without --force the final
rename goes onto a path that is missing or an empty directory (rename(2) refuses a non-empty one),
so of two compiles racing to the same `-o` exactly one wins and the other is refused. Staging
folders carry their owner's pid in their name (`.NAME.staging-PID-XXXX`); a compile sweeps the
ones whose owner is dead (killed with SIGKILL, or a power loss) before it starts its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx

from runtime.signals import stop_signals_deferred
from runtime.trainer import sha256_file

from .errors import GfError

MANIFEST = "manifest.json"
MODEL_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
# Scratch folders beside an output: `.NAME.staging-PID-XXXX` while writing, `.NAME.retired-PID-XXXX`
# for the old output that --force swaps out.
SCRATCH_KINDS = ("staging", "retired")
# Errors that mean "this place cannot take the output" rather than a bug: one line, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def check_output_dir(output_dir: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory unless asked, before doing any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise GfError(f"{output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise GfError(f"{output_dir}: directory is not empty; pass --force to replace it")


def write_error(exc: OSError, target: Path) -> GfError:
    """One line for an output that the file system refused (full disk, read-only, no permission)."""
    reason = (exc.strerror or type(exc).__name__).lower()
    hint = "; free some space and run it again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return GfError(f"{target}: cannot write it ({reason}); nothing was written{hint}")


@contextlib.contextmanager
def staging_directory(output_dir: Path) -> Iterator[Path]:
    """A sibling temp dir that is removed on any failure or stop signal, so no half-written output remains."""
    output_dir = output_dir.resolve()
    staging = None
    created: list[Path] = []  # parent folders made for this output: removed again if it fails
    try:
        make_parents(output_dir.parent, created)
        sweep_stale_scratch(output_dir)
        # A stop signal between creating the folder and knowing its name would leak it.
        with stop_signals_deferred():
            staging = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(output_dir, 'staging')}-", dir=output_dir.parent))
        yield staging
    except OSError as exc:
        _remove(staging, created)
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, output_dir) from None
        raise
    except BaseException:
        _remove(staging, created)
        raise


def make_parents(directory: Path, created: list[Path]) -> None:
    """`mkdir -p directory`, appending each folder it makes to `created` (outermost first)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        created.append(folder)


def _remove(scratch: Path | None, created: list[Path]) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty: never a folder that something else filled meanwhile


def publish(staging: Path, output_dir: Path, force: bool = False) -> None:
    """Move the finished staging dir into place, atomically.

    Without `force` it lands only on a missing path or an empty directory: an output that appeared
    since `check_output_dir` (another compile to the same -o) is kept and this one is refused. With
    `force` an existing output is swapped out, then deleted. Stop signals are held back during the
    renames: between the two of --force the target would be missing.
    """
    output_dir = output_dir.resolve()
    staging.chmod(0o755)  # mkdtemp makes it owner-only; artifacts are meant to be shared
    with stop_signals_deferred():
        try:
            os.rename(staging, output_dir)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if not force or not output_dir.is_dir():
                what = "a directory that is not empty" if output_dir.is_dir() else "something that is not a directory"
                raise GfError(
                    f"{output_dir}: became {what} while this ran (another compile?); it was left as it is and "
                    "nothing was written; pass --force to replace it"
                ) from None
        retired = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(output_dir, 'retired')}-", dir=output_dir.parent))
        os.replace(output_dir, retired)
        os.rename(staging, output_dir)
    shutil.rmtree(retired, ignore_errors=True)


def sweep_stale_scratch(output_dir: Path) -> list[Path]:
    """Remove `.NAME.staging-PID-*` / `.NAME.retired-PID-*` folders whose process is gone; returns them."""
    output_dir = Path(output_dir)
    pattern = re.compile(rf"^{re.escape(f'.{output_dir.name}.')}(?:{'|'.join(SCRATCH_KINDS)})-(\d+)-")
    swept = []
    with contextlib.suppress(OSError):
        for path in output_dir.parent.iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and not path.is_symlink() and not _process_alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                swept.append(path)
    return swept


def _scratch_prefix(output_dir: Path, kind: str) -> str:
    return f".{output_dir.name}.{kind}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a name we cannot judge): leave its folder alone
    return True


def write_file_atomically(path: Path, write: Callable[[Path], None], force: bool = True) -> Path:
    """Let `write` fill a temporary sibling of `path`, then rename it into place.

    A full disk, a read-only folder or a stop signal leaves `path` as it was and no temporary file.
    Without `force` an existing `path` is kept and the write refused (os.link does not replace).
    """
    path = Path(path)
    temporary = None
    created: list[Path] = []
    try:
        make_parents(path.parent, created)
        with stop_signals_deferred():
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            os.close(handle)
            temporary = Path(name)
        write(temporary)
        os.chmod(temporary, 0o644)
        if force:
            os.replace(temporary, path)
        else:
            _place_without_replacing(temporary, path)
    except BaseException as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        _remove(None, created)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path) from None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
            raise GfError(f"{path}: cannot write it ({(exc.strerror or '').lower()})") from None
        raise
    if temporary is not None:
        temporary.unlink(missing_ok=True)
    return path


def _place_without_replacing(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` unless `path` exists, atomically where hard links exist."""
    try:
        os.link(temporary, path)  # fails if `path` exists, however recently it appeared
    except FileExistsError:
        raise GfError(f"{path}: exists (it appeared while this ran?); pass --force to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # No hard links here (FAT, some network file systems): check, then rename; a race is possible only here.
        if path.exists():
            raise GfError(f"{path}: exists (it appeared while this ran?); pass --force to replace it") from None
        os.rename(temporary, path)


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
