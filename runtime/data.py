"""Loading training data (.npz files or image folders) with the preprocessing that the manifest records.

An .npz is checked before any array is read: its members' .npy headers (shape, dtype) against the
manifest's per-sample shape and against a memory cap, so a 2 MB zip of zeros that declares a 2 GiB
array is refused without allocating it (an object dtype, which would need pickle, too).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RunError


@dataclass
class Dataset:
    x: np.ndarray  # float32, preprocessed, shape (N, *input_shape[1:])
    y: np.ndarray  # int64 class ids, or float32 targets for MSE

    def __len__(self) -> int:
        return len(self.x)


def preprocess(x: np.ndarray, spec: dict | None) -> np.ndarray:
    """uint8 images -> float32 via the manifest's scale/mean/std; float data is used as given.

    mean and std are per channel: axis 1 for layout NCHW (the default), the last axis for NHWC.
    """
    if x.dtype == np.uint8:
        if not spec:
            raise RunError(
                "the data is uint8 but the artifacts record no preprocessing to convert it "
                "(gfcompile bundle --preprocess records one)"
            )
        x = x.astype(np.float32) * np.float32(spec.get("scale", 1.0 / 255.0))
        if str(spec.get("layout", "NCHW")).upper() == "NHWC":
            channel_shape = (1,) * (x.ndim - 1) + (-1,)
        else:
            channel_shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(spec.get("mean", [0.0]), dtype=np.float32).reshape(channel_shape)
        std = np.asarray(spec.get("std", [1.0]), dtype=np.float32).reshape(channel_shape)
        return (x - mean) / std
    if not np.issubdtype(x.dtype, np.floating):
        raise RunError(f"input data must be uint8 images or floats, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def load_data(path: Path, manifest: dict, allow_nonfinite: bool = False) -> Dataset:
    """An .npz file (arrays x and y) or a folder of images with one subfolder per class.

    Samples with NaN or Inf inputs are refused unless `allow_nonfinite` (training with
    skip_nonfinite then drops the batches they spoil).
    """
    path = Path(path)
    if path.is_dir():
        from .images import load_image_folder  # Pillow only when images are used

        x, y, _ = load_image_folder(path, manifest)
        return validate(preprocess(x, manifest.get("preprocess")), y, manifest, str(path), allow_nonfinite)
    return load_npz(path, manifest, allow_nonfinite)


def load_npz(path: Path, manifest: dict, allow_nonfinite: bool = False, max_bytes: int | None = None) -> Dataset:
    """Arrays x and y of an .npz; their headers are checked against the manifest and `max_bytes` first.

    `max_bytes` bounds the memory that loading and preprocessing take (default: half of the memory
    available now).
    """
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such data file")
    if not path.is_file():
        raise RunError(f"{path}: not a file; expected an .npz file or a folder of class subfolders")
    check_npz_headers(path, manifest, available_memory() // 2 if max_bytes is None else max_bytes)
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            x_raw, y = archive["x"], archive["y"]
    except Exception as exc:  # zipfile, zlib, and numpy's format checks raise unrelated types for bad bytes
        raise RunError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    return validate(preprocess(x_raw, manifest.get("preprocess")), y, manifest, str(path), allow_nonfinite)


def read_npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array in an .npz, from the .npy headers alone: no array data is read."""
    with open(path, "rb") as handle:
        if handle.read(6) == b"\x93NUMPY":
            raise RunError(f"{path}: a single .npy array; expected an .npz file with arrays 'x' and 'y'")
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise RunError(
                            f"{path}: {info.filename} is .npy format {version}, which this runtime does not read"
                        )
                    header_bytes = member.tell()
                if dtype.hasobject:
                    raise RunError(
                        f"{path}: {info.filename} holds Python objects (pickle); only numeric arrays are read"
                    )
                size = math.prod(shape) * dtype.itemsize
                if info.file_size != header_bytes + size:
                    raise RunError(
                        f"{path}: {info.filename} declares {list(shape)} {dtype} ({size} bytes) but holds "
                        f"{info.file_size - header_bytes}; the file is corrupted"
                    )
                headers[info.filename[: -len(".npy")]] = (tuple(shape), dtype)
    except RunError:
        raise
    except Exception as exc:  # zipfile and numpy's header parser raise unrelated types for bad bytes
        raise RunError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    return headers


def check_npz_headers(path: Path, manifest: dict, max_bytes: int) -> None:
    """Refuse an .npz whose x/y do not fit the model's per-sample shape, or that would not fit in `max_bytes`."""
    headers = read_npz_headers(path)
    if "x" not in headers or "y" not in headers:
        raise RunError(f"{path}: expected arrays 'x' and 'y', found {sorted(headers)}")
    (x_shape, x_dtype), (y_shape, y_dtype) = headers["x"], headers["y"]
    if x_dtype != np.uint8 and not np.issubdtype(x_dtype, np.floating):
        raise RunError(f"{path}: input data must be uint8 images or floats, got dtype {x_dtype}")
    if not (np.issubdtype(y_dtype, np.integer) or np.issubdtype(y_dtype, np.floating)):
        raise RunError(f"{path}: labels must be numbers, got dtype {y_dtype}")
    expected = [int(d) for d in manifest["inputs"][0]["shape"][1:]]
    if len(x_shape) >= 1 and list(x_shape[1:]) != expected:
        raise RunError(f"{path}: inputs have shape {list(x_shape[1:])} per sample, the model expects {expected}")
    if len(x_shape) >= 1 and len(y_shape) >= 1 and x_shape[0] != y_shape[0]:
        raise RunError(f"{path}: {x_shape[0]} inputs but {y_shape[0]} labels")
    # Loading reads x and y; the finiteness check takes a byte per value; other than float32 x
    # preprocessing makes a float32 copy and one temporary of that size; labels become int64.
    converted = 0 if x_dtype == np.float32 else 2 * 4
    needed = math.prod(x_shape) * (x_dtype.itemsize + 1 + converted) + math.prod(y_shape) * (y_dtype.itemsize + 8)
    if needed > max_bytes:
        raise RunError(
            f"{path}: x is {list(x_shape)} {x_dtype}; loading it takes about {needed / 2**20:,.0f} MiB, more than "
            f"the {max_bytes / 2**20:,.0f} MiB this device can spare; split the data into smaller files"
        )


def available_memory() -> int:
    """Bytes of memory available to new allocations now (MemAvailable; physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 32


def validate(x: np.ndarray, y: np.ndarray, manifest: dict, source: str, allow_nonfinite: bool = False) -> Dataset:
    if x.ndim == 0 or y.ndim == 0:
        raise RunError(
            f"{source}: x and y must be arrays with one entry per sample, got shapes {x.shape} and {y.shape}"
        )
    if len(x) == 0:
        raise RunError(f"{source}: the dataset is empty")
    if len(x) != len(y):
        raise RunError(f"{source}: {len(x)} inputs but {len(y)} labels")
    expected = list(manifest["inputs"][0]["shape"][1:])
    if list(x.shape[1:]) != expected:
        raise RunError(f"{source}: inputs have shape {list(x.shape[1:])} per sample, the model expects {expected}")
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not allow_nonfinite and not finite.all():
        bad = np.flatnonzero(~finite)
        raise RunError(
            f"{source}: {len(bad)} of {len(x)} samples have NaN or Inf inputs (first: sample {bad[0]}); "
            "clean the data, or train with --skip-nonfinite to skip the batches they spoil"
        )
    if manifest["loss"] in ("cross_entropy", "pixel_cross_entropy"):
        if not np.issubdtype(y.dtype, np.integer):
            raise RunError(f"{source}: class labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        classes = int(manifest["outputs"][0]["shape"][1])
        valid = (y >= 0) & (y < classes)
        if manifest["loss"] == "pixel_cross_entropy" and manifest.get("ignore_index") is not None:
            valid |= y == manifest["ignore_index"]
        if not np.all(valid):
            bad = y[~valid][0]
            raise RunError(f"{source}: label {bad} is out of range for {classes} classes")
    else:
        if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
            raise RunError(f"{source}: regression targets must be numbers, got dtype {y.dtype}")
        y = y.astype(np.float32)
        if not allow_nonfinite and not np.isfinite(y).all():
            raise RunError(f"{source}: targets contain NaN or Inf; clean the data, or train with --skip-nonfinite")
    expected_label = list(manifest["labels"][0]["shape"][1:]) if manifest.get("labels") else None
    if expected_label is not None and list(y.shape[1:]) != expected_label:
        raise RunError(f"{source}: labels have shape {list(y.shape[1:])} per sample, expected {expected_label}")
    return Dataset(x=x, y=y)


def batches(data: Dataset, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled full batches (the compiled graph has a static batch size).

    Batch k depends only on (seed, k), so training resumed at step k sees exactly the
    batches it would have seen without the interruption.
    """
    if len(data) < batch_size:
        raise RunError(f"the dataset has {len(data)} samples, fewer than the compiled batch size {batch_size}")
    per_epoch = len(data) // batch_size
    step, order, order_epoch = start_step, None, -1
    while True:
        epoch, offset = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = np.random.default_rng([seed, epoch]).permutation(len(data)), epoch
        index = order[offset * batch_size : (offset + 1) * batch_size]
        yield data.x[index], data.y[index]
        step += 1


def eval_batches(data: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Every sample once, the last batch padded by repetition; yields the count of real samples.

    Batches are taken by index arrays, as `batches` takes them, so `data.x` may be anything indexed
    that way (runtime.feature_cache.FeatureStore: cached features, one array or a tuple per batch).
    """
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        real = len(index)
        if real < batch_size:
            index = np.resize(index, batch_size)
        yield data.x[index], data.y[index], real
