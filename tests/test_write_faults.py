"""Outputs onto a full disk or a read-only file system, and inputs built to exhaust memory (issue 15, V5, V8).

The full disk is a real tmpfs filled to its last byte, the read-only folder a real read-only
tmpfs (chmod does not stop root, which CI runs as). Every command that writes (compile, bundle to
a folder and to an archive, checkpoints from `gfcompile train` and `gftrain`, `diff --snapshot`,
`inspect --plot`) must answer with one line naming the reason, exit 2, and leave nothing behind.
The .npz zip bomb is real: a 2 MB file whose x expands to 512 MiB; the image bombs are PNGs that
declare 100 and 900 megapixels.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from tests.test_hostile_inputs import DRIVER
from tests.tiny_models import save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
INPUT = (3, 16, 16)
REASONS = {"full": "no space left on device", "readonly": "read-only file system"}


def _mount(target: Path, options: str) -> None:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip() or result.returncode}); these cases need root")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full-disk and read-only cases need a tmpfs")
    tmp = tmp_path_factory.mktemp("write_faults")
    model = Path(save(tiny_cnn(seed=0), tmp / "tiny.onnx"))
    artifacts = compile_model(
        model, CompileConfig(train_layers=2, batch_size=BATCH, output_dir=tmp / "artifacts"), report=lambda m: None
    )
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", x=rng.standard_normal((16, *INPUT)).astype(np.float32), y=rng.integers(0, 5, 16))
    mounts = {"full": tmp / "full", "readonly": tmp / "readonly"}
    for kind, folder in mounts.items():
        folder.mkdir()
        _mount(folder, "size=256k" if kind == "full" else "size=64k,ro")
    try:
        filler = mounts["full"] / "filler"
        with open(filler, "wb", buffering=0) as handle:  # fill the tmpfs to its last byte: the disk is really full
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield {"tmp": tmp, "model": model, "artifacts": artifacts, "data": tmp / "data.npz", **mounts}
    finally:
        for folder in mounts.values():
            subprocess.run(["umount", str(folder)], capture_output=True)


# (module, argv after it) for an output at OUT: every command that writes something.
WRITERS = {
    "compile": ("gfcompile", lambda w, out: [w["model"], "--train-layers", "2", "--batch-size", "2", "-o", out]),
    "compile, missing parent": (
        "gfcompile",
        lambda w, out: [w["model"], "--train-layers", "2", "--batch-size", "2", "-o", out / "sub" / "out"],
    ),
    "bundle folder": ("gfcompile", lambda w, out: ["bundle", w["artifacts"], "-o", out]),
    "bundle archive": ("gfcompile", lambda w, out: ["bundle", w["artifacts"], "-o", out.with_suffix(".tar.gz")]),
    "train checkpoint": (
        "gfcompile",
        lambda w, out: ["train", w["artifacts"], "--data", w["data"], "--steps", "1", "--save", out],
    ),
    "gftrain checkpoint": (
        "runtime",
        lambda w, out: [w["artifacts"], "--data", w["data"], "--steps", "1", "--checkpoint", out],
    ),
    "diff snapshot": ("gfcompile", lambda w, out: ["diff", w["model"], w["model"], "--snapshot", out]),
    "inspect plot": ("gfcompile", lambda w, out: ["inspect", w["artifacts"], "--plot", out.with_suffix(".png")]),
}


@pytest.fixture(scope="module")
def results(world: dict) -> dict:
    """Every writer onto both mounts, in one interpreter (the hostile-input table's driver)."""
    calls = [
        (kind, name, module, [str(arg) for arg in make(world, world[kind] / name.replace(" ", "_").replace(",", ""))])
        for kind in REASONS
        for name, (module, make) in WRITERS.items()
    ]
    before = {kind: sorted(p.name for p in world[kind].iterdir()) for kind in REASONS}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps([[module, argv] for _, _, module, argv in calls]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    after = {kind: sorted(p.name for p in world[kind].iterdir()) for kind in REASONS}
    return {
        "by_case": {(kind, name): result for (kind, name, _, _), result in zip(calls, outcome, strict=True)},
        "before": before,
        "after": after,
    }


@pytest.mark.parametrize("kind", list(REASONS))
@pytest.mark.parametrize("name", list(WRITERS))
def test_a_full_or_read_only_target_gets_one_line_and_nothing_partial(results: dict, kind: str, name: str) -> None:
    result = results["by_case"][(kind, name)]
    assert result["code"] == 2, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("gfcompile: error:")]
    assert len(errors) == 1, result["stderr"]
    reasons = [REASONS[kind]]
    if kind == "readonly" and "checkpoint" in name:
        # The trainer refuses an unwritable checkpoint folder up front (os.access), before training.
        reasons.append("permission denied")
    assert any(reason in errors[0].lower() for reason in reasons), errors[0]
    assert "gradient builder" not in errors[0]  # a full disk is not reported as a graph problem


def test_nothing_partial_is_left_on_either_mount(results: dict) -> None:
    assert results["after"] == results["before"] == {"full": ["filler"], "readonly": []}


# --------------------------------------------------------------------------------------------
# Memory bombs
# --------------------------------------------------------------------------------------------


def _npz_bomb(path: Path, samples: int, sample_shape: tuple[int, ...]) -> Path:
    """A real zip bomb: x's .npy member holds samples x sample_shape float32 zeros, deflated."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, *sample_shape), np.float32))
    header["shape"] = (samples, *sample_shape)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            left, chunk = samples * int(np.prod(sample_shape)) * 4, bytes(1 << 22)
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(samples, np.int64))
    return path


PEAK_RSS = """
import json, resource, sys
from runtime.data import load_npz
from runtime.errors import RunError
manifest = json.load(open(sys.argv[1]))
try:
    load_npz(sys.argv[2], manifest, max_bytes=int(sys.argv[3]))
    outcome = "loaded"
except RunError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_an_npz_zip_bomb_is_refused_from_its_headers_with_low_peak_memory(world: dict, tmp_path: Path) -> None:
    samples = (512 << 20) // (4 * int(np.prod(INPUT)))  # x expands to 512 MiB
    bomb = _npz_bomb(tmp_path / "bomb.npz", samples, INPUT)
    assert bomb.stat().st_size < 4 << 20
    manifest = world["artifacts"] / "manifest.json"

    def peak(path: Path, cap: int) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, manifest, path, str(cap)], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    refused = peak(bomb, 64 << 20)
    assert "loading it takes about" in refused["outcome"] and "more than the 64 MiB" in refused["outcome"]
    baseline = peak(world["data"], 64 << 20)  # a small valid file: the interpreter's own footprint
    assert baseline["outcome"] == "loaded"
    assert refused["peak_kib"] < baseline["peak_kib"] + 32 * 1024, (refused, baseline)  # not the 512 MiB
    # The same bomb with the wrong per-sample shape is refused by the CLI from the header alone.
    wrong = _npz_bomb(tmp_path / "wrong.npz", samples // 4, (3, 8, 8))
    result = subprocess.run(
        [sys.executable, "-m", "runtime", world["artifacts"], "--data", wrong, "--steps", "1",
         "--checkpoint", tmp_path / "ckpt"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "inputs have shape [3, 8, 8] per sample, the model expects [3, 16, 16]" in result.stderr
    assert not (tmp_path / "ckpt").exists()


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height greyscale pixels: its IHDR says so, its IDAT holds one row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("side", "message"),
    [(30000, "decompression bomb"), (10000, "10000 x 10000 pixels is more than the 89,478,485")],
    ids=["900 megapixels", "100 megapixels"],
)
def test_image_bombs_are_refused_before_decoding(world: dict, tmp_path: Path, side: int, message: str) -> None:
    images = tmp_path / "images"
    for label in ("0", "1"):
        (images / label).mkdir(parents=True)
    _png_header_only(images / "0" / "bomb.png", side, side)
    result = subprocess.run(
        [sys.executable, "-m", "runtime", world["artifacts"], "--data", images, "--steps", "1",
         "--checkpoint", tmp_path / "ckpt"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gfcompile: error:")]
    assert len(errors) == 1 and "bomb.png" in errors[0] and message in errors[0], result.stderr
