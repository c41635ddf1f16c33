"""Reading and writing the safetensors format with numpy only (no safetensors package on devices).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
header mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
the byte buffer after the header) plus an optional "__metadata__" of string -> string, then the
little-endian tensor bytes. Files written here load with `safetensors.numpy.load_file` and with
PyTorch's loader, and this reader takes theirs.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import RunError

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
_CODES = {np.dtype(v).name: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` to `path` (not atomic; see PortableTrainer.save)."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        code = _CODES.get(array.dtype.name)
        if code is None:
            raise RunError(f"{path}: cannot store {name} of dtype {array.dtype} in safetensors")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for data in blobs:
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; RunError naming the file if it is malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        if length > min(_MAX_HEADER, len(raw) - 8):
            raise ValueError("header length past the end of the file")
        header = json.loads(raw[8 : 8 + length])
        body = memoryview(raw)[8 + length :]
        metadata = {str(k): str(v) for k, v in header.pop("__metadata__", {}).items()}
        tensors = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
            shape = tuple(int(d) for d in entry["shape"])
            if not 0 <= begin <= end <= len(body) or end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{name}: data offsets do not match its shape")
            tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not a valid safetensors checkpoint ({exc})") from None
    return tensors, metadata
