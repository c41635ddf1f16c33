"""Every hostile input of issues 7 and 15 through the real command lines, each in its own subprocess.

Each case asserts exit code 2, exactly one error line naming the problem, no traceback, and that
the output (artifacts folder, checkpoint, bundle, snapshot) is absent or byte-for-byte unchanged.
Models are tiny CNNs built in the test (tests/tiny_models.py), so a case costs one process start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gfcompile.bundle import make_bundle
from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.data import batches, load_data
from runtime.errors import RunError
from runtime.trainer import Trainer
from tests.tiny_models import ConvSpec, save, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
CLASSES = 5
INPUT = (3, 16, 16)


def run(*args: str | Path, module: str = "gfcompile", timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def tree_digest(path: Path) -> dict[str, str] | None:
    """Every file under `path` with its sha256 (None when `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def data_file(path: Path, n: int = 16, seed: int = 0, x=None, y=None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *INPUT)).astype(np.float32) if x is None else x
    y = rng.integers(0, CLASSES, n) if y is None else y
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Hostile files, a compiled artifacts folder, and data, shared by all cases."""
    tmp = tmp_path_factory.mktemp("hostile")
    good = tiny_cnn(seed=0)
    e: dict = {"tmp": tmp, "model": save(good, tmp / "tiny.onnx")}
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "text.onnx").write_text("this is not a protobuf\n" * 10)
    e["truncated"] = tmp / "truncated.onnx"
    e["truncated"].write_bytes(Path(e["model"]).read_bytes()[:1000])
    (tmp / "folder.onnx").mkdir()

    # External data whose file is missing. A > 2 GB model need not be materialised: what fails is the
    # missing data file, and the same code path (location checked before loading) handles both.
    external = tmp / "external"
    external.mkdir()
    onnx.save(good, str(external / "big.onnx"), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    (external / "big.onnx.data").unlink()
    e["external"] = external / "big.onnx"
    escaping = tmp / "escaping"
    escaping.mkdir()
    onnx.save(good, str(escaping / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(escaping / "m.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../../etc/passwd"
    onnx.save(model, str(escaping / "m.onnx"))
    e["escaping"] = escaping / "m.onnx"

    broken = tiny_cnn()
    broken.graph.node[1].input[0] = "undefined_tensor"
    e["checker"] = save(broken, tmp / "checker.onnx")
    newer_ir = tiny_cnn()
    newer_ir.ir_version = 11
    e["ir11"] = save(newer_ir, tmp / "ir11.onnx")
    for version in (22, 23):
        newer = tiny_cnn()
        newer.opset_import[0].version = version
        e[f"opset{version}"] = save(newer, tmp / f"opset{version}.onnx")
    no_conv = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Flatten", ["x"], ["f"], name="flatten")],
            "no_conv",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])],
            [onnx.helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, [2, 48])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    no_conv.ir_version = 8
    e["no_conv"] = save(no_conv, tmp / "no_conv.onnx")
    dynamic = tiny_cnn()
    for axis in (2, 3):
        dynamic.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = "side"
    e["dynamic"] = save(dynamic, tmp / "dynamic.onnx")
    e["batch1"] = save(tiny_cnn(batch=1), tmp / "batch1.onnx")
    for kind in ("LSTM", "Loop", "If", "Contrib", "Custom"):
        # After conv2 of three: in the trainable part of --train-layers 2.
        e[f"trainable_{kind}"] = save(tiny_cnn(extra=kind, extra_after=1), tmp / f"trainable_{kind}.onnx")
    e["pooled_small"] = save(tiny_cnn([ConvSpec(4, stride=2), ConvSpec(4, stride=2), ConvSpec(4)]), tmp / "small.onnx")
    (tmp / "patch_map.json").write_text(json.dumps({"not_a_layer": 2}))
    (tmp / "patch_map_too_big.json").write_text(json.dumps({"conv2": 9}))
    e["non_empty"] = tmp / "non_empty"
    e["non_empty"].mkdir()
    (e["non_empty"] / "keep.txt").write_text("user data")

    # Artifacts and data for train / eval / gftrain / bundle.
    artifacts = tmp / "artifacts"
    compile_model(
        Path(e["model"]),
        CompileConfig(train_layers=2, filter_layers=1, batch_size=BATCH, output_dir=artifacts),
        report=lambda message: None,
    )
    e["artifacts"] = artifacts
    e["data"] = data_file(tmp / "data.npz")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, *INPUT)).astype(np.float32)
    y = rng.integers(0, CLASSES, 16)
    e["wrong_shape"] = data_file(tmp / "wrong_shape.npz", x=x[:, :, :8, :8], y=y)
    e["wrong_dtype"] = data_file(tmp / "wrong_dtype.npz", x=(x * 10).astype(np.int32), y=y)
    e["labels_out"] = data_file(tmp / "labels_out.npz", x=x, y=y + CLASSES)
    e["labels_float"] = data_file(tmp / "labels_float.npz", x=x, y=y.astype(np.float32))
    x_nan, x_inf = x.copy(), x.copy()
    x_nan[5, 0, 3, 3] = np.nan
    x_inf[2, 1, 0, 0] = np.inf
    e["nan"] = data_file(tmp / "nan.npz", x=x_nan, y=y)
    e["inf"] = data_file(tmp / "inf.npz", x=x_inf, y=y)
    e["empty_data"] = data_file(tmp / "empty_data.npz", x=x[:0], y=y[:0])
    e["mismatch"] = data_file(tmp / "mismatch.npz", x=x, y=y[:10])
    e["too_few"] = data_file(tmp / "too_few.npz", x=x[:2], y=y[:2])
    np.save(tmp / "single.npy", x)
    e["npy"] = tmp / "single.npy"
    e["missing_data"] = tmp / "missing.npz"
    (tmp / "text.npz").write_text("not an archive")
    e["text_npz"] = tmp / "text.npz"
    e["truncated_npz"] = tmp / "truncated.npz"
    e["truncated_npz"].write_bytes(Path(e["data"]).read_bytes()[:3000])

    def tampered(name: str, change: Callable[[Path], None]) -> Path:
        copy = tmp / name
        shutil.copytree(artifacts, copy)
        change(copy)
        return copy

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def manifest_edit(key: str, value) -> Callable[[Path], None]:
        def edit(directory: Path) -> None:
            manifest = json.loads((directory / "manifest.json").read_text())
            manifest[key] = value
            (directory / "manifest.json").write_text(json.dumps(manifest))

        return edit

    e["tampered_model"] = tampered("tampered_model", lambda d: flip_byte(d / "eval_model.onnx"))
    e["tampered_checkpoint"] = tampered("tampered_checkpoint", lambda d: flip_byte(d / "checkpoint"))
    e["manifest_version"] = tampered("manifest_version", manifest_edit("format_version", 99))
    e["manifest_json"] = tampered("manifest_json", lambda d: (d / "manifest.json").write_text("{ not json"))
    e["no_manifest"] = tampered("no_manifest", lambda d: (d / "manifest.json").unlink())
    # A checkpoint trained from other artifacts (another model), and one with garbage bytes.
    other = tmp / "other_artifacts"
    compile_model(
        Path(save(tiny_cnn(seed=1), tmp / "other.onnx")),
        CompileConfig(train_layers=2, batch_size=BATCH, output_dir=other),
        report=lambda message: None,
    )
    trainer = Trainer(other)
    trainer.fit(load_data(e["data"], trainer.manifest), steps=1, log_every=0)
    trainer.save(tmp / "other_checkpoint")
    e["other_checkpoint"] = tmp / "other_checkpoint"
    (tmp / "garbage_checkpoint").write_bytes(os.urandom(512))
    e["garbage_checkpoint"] = tmp / "garbage_checkpoint"

    # Issue 15: bundles are data verified against SHA256SUMS and, with --trusted-key, a signature.
    key = ed25519.Ed25519PrivateKey.generate()
    e["sign_key"] = tmp / "bundle_key.pem"
    e["sign_key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    e["trusted_key"] = tmp / "bundle_key.pub"
    e["trusted_key"].write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    planted = make_bundle(artifacts, tmp / "bundle_planted")
    (planted / "numpy.py").write_text("raise SystemExit(99)\n")
    e["bundle_planted"] = planted
    edited = make_bundle(artifacts, tmp / "bundle_lr_edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["optimizer"]["lr"] = 0.901
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2))
    e["bundle_lr_edited"] = edited
    poisoned = make_bundle(artifacts, tmp / "bundle_poisoned", sign_key=e["sign_key"])
    flip_byte(poisoned / "checkpoint")
    manifest = json.loads((poisoned / "manifest.json").read_text())
    manifest["files"]["checkpoint"] = hashlib.sha256((poisoned / "checkpoint").read_bytes()).hexdigest()
    (poisoned / "manifest.json").write_text(json.dumps(manifest, indent=2))
    listed = [line.split("  ")[1] for line in (poisoned / "SHA256SUMS").read_text().splitlines()]
    (poisoned / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((poisoned / name).read_bytes()).hexdigest()}  {name}\n" for name in listed)
    )  # re-hashed by someone without the key
    e["bundle_poisoned"] = poisoned
    # A zip bomb whose header declares 64 MiB of samples with the wrong shape: refused from the header.
    bomb_header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 3, 8, 8), np.float32))
    bomb_header["shape"] = ((64 << 20) // (3 * 8 * 8 * 4), 3, 8, 8)
    e["npz_bomb"] = tmp / "bomb.npz"
    with zipfile.ZipFile(e["npz_bomb"], "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, bomb_header)
            left = bomb_header["shape"][0] * 3 * 8 * 8 * 4
            while left > 0:
                member.write(bytes(min(left, 4 << 20)))
                left -= 4 << 20
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(bomb_header["shape"][0], np.int64))
    # A PNG that declares 30000 x 30000 pixels (its IHDR says so, its data is one row).
    e["png_bomb"] = tmp / "png_bomb"
    (e["png_bomb"] / "0").mkdir(parents=True)
    (e["png_bomb"] / "0" / "huge.png").write_bytes(png_declaring(30000, 30000))
    e["deep_manifest"] = tampered("deep_manifest", manifest_edit("extra", nested(900)))
    return e


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass(frozen=True)
class Case:
    args: Callable[[dict, Path], list]  # (env, output path) -> argv after the module
    message: str | tuple[str, ...]  # every string must appear in the one error line
    module: str = "gfcompile"
    output: str = "out"  # what the case would write: its path under the case folder


def compile_case(model: str, *flags: str, message: str | tuple[str, ...]) -> Case:
    return Case(lambda e, out: [e[model], *flags, "-o", out], message)


def train_case(data: str, *flags: str, message: str | tuple[str, ...], artifacts: str = "artifacts") -> Case:
    return Case(
        lambda e, out: ["train", e[artifacts], "--data", e[data], "--steps", "2", "--save", out, *flags], message
    )


def gftrain_case(
    data: str,
    *flags: str,
    message: str | tuple[str, ...],
    artifacts: str = "artifacts",
    trusted_key: str | None = None,
) -> Case:
    """`trusted_key` names the env entry passed as --trusted-key."""

    def args(e: dict, out: Path) -> list:
        key = ["--trusted-key", e[trusted_key]] if trusted_key else []
        return [e[artifacts], "--data", e[data], "--steps", "2", "--checkpoint", out, *flags, *key]

    return Case(args, message, module="runtime")


CASES: dict[str, Case] = {
    # ---- compile: the file itself
    "missing file": Case(lambda e, out: [e["tmp"] / "nope.onnx", "-o", out], "no such file"),
    "directory": compile_case("tmp", message="is a directory"),
    "directory named .onnx": Case(lambda e, out: [e["tmp"] / "folder.onnx", "-o", out], "is a directory"),
    "empty file": Case(lambda e, out: [e["tmp"] / "empty.onnx", "-o", out], "file is empty"),
    "not onnx": Case(lambda e, out: [e["tmp"] / "text.onnx", "-o", out], "not a readable ONNX model"),
    "truncated protobuf": compile_case("truncated", message="not a readable ONNX model"),
    "external data missing": compile_case("external", message=("'big.onnx.data'", "missing", "conv1.weight")),
    "external data outside folder": compile_case("escaping", message="outside the model's folder"),
    "checker failure": compile_case("checker", message=("fails the ONNX checker", "undefined_tensor")),
    "IR too new": compile_case("ir11", message=("IR version 11", "<= 10", "--downconvert")),
    "opset 22 needs --downconvert": compile_case("opset22", message=("opset 22", "<= 21", "--downconvert")),
    "opset 23 cannot be converted here": compile_case(
        "opset23", "--downconvert", message=("opset 23", "version_converter", "convert_version(onnx.load(")
    ),
    # ---- compile: what the flags ask of the model
    "no conv layers": compile_case("no_conv", message="no Conv layers"),
    "filter layers too many": compile_case("model", "--filter-layers", "4", message="the model has 3 conv layers"),
    "filter layers negative": compile_case("model", "--filter-layers", "-1", message=("-1", "3 conv layers")),
    "train layers zero": compile_case("model", "--train-layers", "0", message=("--train-layers 0", "3 conv layers")),
    "train layers negative": compile_case("model", "--train-layers", "-2", message=("-2", "3 conv layers")),
    "train layers too many": compile_case("model", "--train-layers", "7", message=("7", "1..3")),
    "default train layers too many": compile_case("model", message=("(the default)", "3 conv layers")),
    "train fewer than filter": compile_case(
        "model", "--filter-layers", "3", "--train-layers", "2", message="smaller than --filter-layers"
    ),
    "patch size zero": compile_case(
        "model", "--filter-layers", "1", "--patch-size", "0", message="patch size must be >= 1"
    ),
    "patch size negative": compile_case("model", "--filter-layers", "1", "--patch-size", "-4", message=">= 1, got -4"),
    # A global --patch-size shrinks to fit each layer; an r set for the layer itself is refused.
    "patch larger than layer": Case(
        lambda e, out: [
            e["model"],
            "--filter-layers",
            "2",
            "--patch-size-map",
            e["tmp"] / "patch_map_too_big.json",
            "-o",
            out,
        ],
        ("patch size 9", "--patch-size-map", "'conv2'", "8x8"),
    ),
    "patch map unknown layer": Case(
        lambda e, out: [e["model"], "--filter-layers", "1", "--patch-size-map", e["tmp"] / "patch_map.json", "-o", out],
        "not_a_layer",
    ),
    "patch map missing file": Case(
        lambda e, out: [e["model"], "--filter-layers", "1", "--patch-size-map", e["tmp"] / "none.json", "-o", out],
        "cannot read the patch-size map",
    ),
    "row tiles exceed height": compile_case(
        "pooled_small", "--train-layers", "1", "--batch-size", "2", "--row-tiles", "40", message="use --row-tiles <="
    ),
    "row tiles one": compile_case("model", "--train-layers", "1", "--row-tiles", "1", message="0 (off) or >= 2"),
    "memory budget unmeetable": compile_case(
        "model", "--train-layers", "1", "--batch-size", "2", "--memory-budget", "0.0001", message="cannot be met"
    ),
    "memory budget negative": compile_case("model", "--train-layers", "1", "--memory-budget", "-3", message="positive"),
    "tiles and budget": compile_case(
        "model", "--train-layers", "1", "--row-tiles", "2", "--memory-budget", "10", message="not both"
    ),
    **{
        f"{op} in trainable part": compile_case(
            f"trainable_{op}", "--train-layers", "2", message=(f"'extra_{op.lower()}'", f"({op})", "--train-layers 1")
        )
        for op in ("LSTM", "Loop", "If")
    },
    "contrib op in trainable part": compile_case(
        "trainable_Contrib",
        "--train-layers",
        "2",
        message=("'extra_contrib'", "com.microsoft::Gelu", "--train-layers 1"),
    ),
    "custom domain op": compile_case(
        "trainable_Custom", "--train-layers", "2", message=("'extra_custom'", "com.example::MyRelu", "no kernel")
    ),
    "dynamic spatial dims": compile_case(
        "dynamic", "--train-layers", "1", message=("dynamic dims", "--input-shape", "static")
    ),
    "fixed batch, other --batch-size": compile_case(
        "batch1",
        "--batch-size",
        "4",
        message=("fixed batch of 1", "--batch-size asks for 4", "dynamic batch axis"),
    ),
    "input shape wrong rank": compile_case("model", "--train-layers", "1", "--input-shape", "3,16", message="rank 4"),
    "input shape conflicts": compile_case("model", "--train-layers", "1", "--input-shape", "3,32,32", message="has 16"),
    "batch size zero": compile_case(
        "model", "--train-layers", "1", "--batch-size", "0", message="--batch-size must be >= 1"
    ),
    "learning rate nan": compile_case("model", "--train-layers", "1", "--lr", "nan", message="--lr must be a positive"),
    "momentum one": compile_case("model", "--optimizer", "sgd", "--momentum", "1", message="--momentum"),
    "output not empty": Case(
        lambda e, out: [e["model"], "--train-layers", "1", "-o", e["non_empty"]], "--force", output="<non_empty>"
    ),
    # ---- train / eval / gftrain: the data
    "data missing": train_case("missing_data", message="no such data file"),
    "data is a file of another kind": train_case("model", message="not a readable .npz"),
    "data wrong shape": train_case("wrong_shape", message=("[3, 8, 8]", "expects [3, 16, 16]")),
    "data wrong dtype": train_case("wrong_dtype", message="dtype int32"),
    "labels out of range": train_case("labels_out", message="out of range for 5 classes"),
    "labels not integers": train_case("labels_float", message="labels must be integers"),
    "NaN inputs": train_case("nan", message=("NaN or Inf", "sample 5", "--skip-nonfinite")),
    "Inf inputs": train_case("inf", message=("NaN or Inf", "sample 2")),
    "empty dataset": train_case("empty_data", message="the dataset is empty"),
    "inputs and labels differ": train_case("mismatch", message="16 inputs but 10 labels"),
    "fewer samples than batch": train_case("too_few", message="fewer than the compiled batch size 4"),
    "npy instead of npz": train_case("npy", message="single .npy array"),
    "text instead of npz": train_case("text_npz", message="not a readable .npz"),
    "truncated npz": train_case("truncated_npz", message="not a readable .npz"),
    "zero steps": train_case("data", "--steps", "0", message="--steps must be >= 1"),
    "eval NaN inputs": Case(lambda e, out: ["eval", e["artifacts"], "--data", e["nan"]], "NaN or Inf"),
    "gftrain NaN inputs": gftrain_case("nan", message=("NaN or Inf", "--skip-nonfinite")),
    "gftrain wrong shape": gftrain_case("wrong_shape", message="expects [3, 16, 16]"),
    "gftrain labels out of range": gftrain_case("labels_out", message="out of range"),
    "gftrain empty dataset": gftrain_case("empty_data", message="empty"),
    # ---- artifacts, manifest and checkpoint that do not match
    "artifacts missing": Case(
        lambda e, out: ["train", e["tmp"] / "none", "--data", e["data"], "--save", out], "no manifest.json"
    ),
    "model hash mismatch": train_case("data", artifacts="tampered_model", message=("eval_model.onnx", "sha256")),
    "checkpoint hash mismatch": train_case("data", artifacts="tampered_checkpoint", message=("checkpoint", "sha256")),
    "manifest version mismatch": train_case("data", artifacts="manifest_version", message="manifest format 99"),
    "manifest not json": train_case("data", artifacts="manifest_json", message="corrupted manifest"),
    "manifest missing": train_case("data", artifacts="no_manifest", message="no manifest.json"),
    "checkpoint from other artifacts": Case(
        lambda e, out: [
            "train",
            e["artifacts"],
            "--data",
            e["data"],
            "--checkpoint",
            e["other_checkpoint"],
            "--save",
            out,
        ],
        "trained from other artifacts",
    ),
    "checkpoint garbage": Case(
        lambda e, out: ["eval", e["artifacts"], "--data", e["data"], "--checkpoint", e["garbage_checkpoint"]],
        "cannot load checkpoint",
    ),
    "gftrain model hash mismatch": gftrain_case("data", artifacts="tampered_model", message="sha256"),
    "gftrain checkpoint from other artifacts": Case(
        lambda e, out: [e["artifacts"], "--data", e["data"], "--checkpoint", e["other_checkpoint"]],
        "trained from other artifacts",
        module="runtime",
        output="<other_checkpoint>",
    ),
    # ---- diff, inspect, bundle
    "diff missing file": Case(
        lambda e, out: ["diff", e["model"], e["tmp"] / "nope.onnx", "--snapshot", out], "no such"
    ),
    "diff empty file": Case(lambda e, out: ["diff", e["model"], e["tmp"] / "empty.onnx", "--snapshot", out], "empty"),
    "diff not onnx": Case(lambda e, out: ["diff", e["model"], e["tmp"] / "text.onnx", "--snapshot", out], "not a"),
    "inspect missing": Case(lambda e, out: ["inspect", e["tmp"] / "nope.onnx", "--plot", out], "no such file"),
    "inspect truncated": Case(lambda e, out: ["inspect", e["truncated"], "--plot", out], "not a readable ONNX model"),
    "inspect no manifest": Case(lambda e, out: ["inspect", e["no_manifest"], "--plot", out], "manifest"),
    "inspect too many layers": Case(
        lambda e, out: ["inspect", e["model"], "--filter-layers", "9", "--plot", out], "the model has 3 conv layers"
    ),
    "bundle missing artifacts": Case(lambda e, out: ["bundle", e["tmp"] / "none", "-o", out], "none"),
    "bundle tampered artifacts": Case(lambda e, out: ["bundle", e["tampered_model"], "-o", out], "sha256"),
    # ---- issue 15: bundles are data that the installed runtime verifies (V3)
    "gftrain bundle with planted numpy.py": gftrain_case(
        "data", artifacts="bundle_planted", message=("numpy.py is not listed in SHA256SUMS",)
    ),
    "gftrain bundle with an edited lr": gftrain_case(
        "data", artifacts="bundle_lr_edited", message="manifest.json does not match its sha256 in SHA256SUMS"
    ),
    "gftrain poisoned checkpoint, re-hashed": gftrain_case(
        "data",
        artifacts="bundle_poisoned",
        trusted_key="trusted_key",
        message="signature does not match the trusted key",
    ),
    "gftrain unsigned bundle, trusted key": gftrain_case(
        "data", artifacts="bundle_lr_edited", trusted_key="trusted_key", message="is not signed"
    ),
    "bundle signed with a public key": Case(
        lambda e, out: ["bundle", e["artifacts"], "-o", out, "--sign-key", e["trusted_key"]], "not a PEM private key"
    ),
    "gftrain usage error": Case(
        lambda e, out: [e["artifacts"], "--checkpoint", out], "the following arguments are required: --data", "runtime"
    ),
    # ---- issue 15: sizes (V8) and nesting (V5)
    "gftrain npz zip bomb": gftrain_case("npz_bomb", message=("[3, 8, 8] per sample", "expects [3, 16, 16]")),
    "gftrain 900-megapixel PNG": gftrain_case("png_bomb", message=("huge.png", "decompression bomb")),
    "diff deeply nested manifest": Case(
        lambda e, out: ["diff", e["artifacts"], e["deep_manifest"], "--snapshot", out], "nested too deeply"
    ),
}


# One interpreter runs the whole table (a process start costs seconds on a loaded machine): the
# driver calls the same `main` functions as the console scripts, with their own stdout and stderr,
# and turns any escaping exception into the traceback Python would print. SUBPROCESS_CASES below
# run once more as real separate command lines.
DRIVER = """
import contextlib, io, json, sys, traceback
from gfcompile.cli import main as gfcompile
from runtime.__main__ import main as gftrain
results = []
for module, argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = (gfcompile if module == "gfcompile" else gftrain)(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""
SUBPROCESS_CASES = [
    "truncated protobuf",
    "LSTM in trainable part",
    "NaN inputs",
    "gftrain checkpoint from other artifacts",
    "inspect truncated",
    "bundle tampered artifacts",
]


def _invocation(env: dict, name: str, out_root: Path) -> tuple[str, list[str], Path]:
    case = CASES[name]
    out = out_root / name.replace(" ", "_") / case.output
    if case.output.startswith("<"):
        out = env[case.output.strip("<>")]
    else:
        out.parent.mkdir(parents=True)
    return case.module, [str(arg) for arg in case.args(env, out)], out


@pytest.fixture(scope="module")
def table(env: dict, tmp_path_factory) -> dict:
    """Run every case; returns {name: (exit code, stderr, output path)} and whether inputs stayed unchanged."""
    out_root = tmp_path_factory.mktemp("hostile_out")
    calls = {name: _invocation(env, name, out_root) for name in CASES}
    inputs_before = {str(p): tree_digest(p) for p in env["tmp"].iterdir()}
    payload = json.dumps([[module, argv] for module, argv, _ in calls.values()])
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], input=payload, capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    inputs_after = {str(p): tree_digest(p) for p in env["tmp"].iterdir()}
    by_name = {name: (r["code"], r["stderr"], calls[name][2]) for name, r in zip(calls, results, strict=True)}
    return {"results": by_name, "inputs_unchanged": inputs_before == inputs_after, "out_root": out_root}


def _check(name: str, code: int, stderr: str, out: Path) -> None:
    case = CASES[name]
    assert code == 2, (name, code, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    # Every entry point, the device runner gftrain included, says `gfcompile: error:` as the README promises.
    assert "gftrain:" not in stderr, (name, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("gfcompile: error:")]
    assert len(errors) == 1, (name, stderr)
    for part in (case.message,) if isinstance(case.message, str) else case.message:
        assert part in errors[0], (name, part, errors[0])
    if not case.output.startswith("<"):  # the two cases that target an existing input are checked as inputs
        assert not out.exists(), name
        assert list(out.parent.iterdir()) == [], (name, list(out.parent.iterdir()))  # no staging or temp files


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gets_one_clear_line(table: dict, name: str) -> None:
    code, stderr, out = table["results"][name]
    _check(name, code, stderr, out)


def test_hostile_inputs_leave_every_input_unchanged(table: dict) -> None:
    # The artifacts, the non-empty output folder, the checkpoints and data files, byte for byte.
    assert table["inputs_unchanged"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_hostile_input_as_a_separate_command(env: dict, tmp_path: Path, name: str) -> None:
    module, argv, out = _invocation(env, name, tmp_path)
    before = {str(p): tree_digest(p) for p in env["tmp"].iterdir()}
    result = run(*argv, module=module)
    _check(name, result.returncode, result.stderr, out)
    assert {str(p): tree_digest(p) for p in env["tmp"].iterdir()} == before


# --------------------------------------------------------------------------------------------
# Down-conversion, and ops in the frozen part that the trainable part refuses
# --------------------------------------------------------------------------------------------


def _eval_logits(artifacts: Path, x: np.ndarray) -> np.ndarray:
    trainer = Trainer(artifacts)
    _, logits = trainer.outputs(x, np.zeros(len(x), np.int64))
    return logits


def _reference_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("what", ["ir11", "opset22"])
def test_downconvert_compiles_and_matches_the_original(env: dict, tmp_path: Path, what: str) -> None:
    out = tmp_path / "out"
    result = run(env[what], "--train-layers", "1", "--batch-size", str(BATCH), "--downconvert", "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["downconvert"] is True
    x = np.random.default_rng(2).standard_normal((BATCH, *INPUT)).astype(np.float32)
    expected = _reference_logits(onnx.load(env["model"]), x)  # the same graph at opset 17 / IR 8
    np.testing.assert_allclose(_eval_logits(out, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "Loop", "Contrib"])
def test_untrainable_ops_in_the_frozen_part_work_untouched(tmp_path: Path, kind: str) -> None:
    model = tiny_cnn(extra=kind, extra_after=0, batch=BATCH)  # after conv1; convs 2 and 3 train
    path = Path(save(model, tmp_path / "model.onnx"))
    # No portable step for LSTM (ORT makes it LSTMTraining, which no lower pass handles) and Gelu
    # (the eval step keeps com.microsoft Gelu): such a compile fails unless --no-portable.
    config = CompileConfig(train_layers=2, output_dir=tmp_path / "out", portable=kind == "Loop")
    out = compile_model(path, config, report=lambda m: None)
    assert kind.lower() in " ".join(n.name for n in onnx.load(str(out / "eval_model.onnx")).graph.node)
    x = np.random.default_rng(3).standard_normal((BATCH, *INPUT)).astype(np.float32)
    np.testing.assert_allclose(_eval_logits(out, x), _reference_logits(model, x), rtol=1e-4, atol=1e-5)
    trainer = Trainer(out)
    losses = trainer.fit(load_data(data_file(tmp_path / "d.npz"), trainer.manifest), steps=2, log_every=0)
    assert all(np.isfinite(losses))


def test_if_with_a_computed_condition_in_the_frozen_part_is_refused_cleanly(tmp_path: Path) -> None:
    # ORT 1.19's gradient builder aborts the process on such a graph even when the If is frozen;
    # the compile runs it in a child process, so the user gets one line instead of a core dump.
    path = save(tiny_cnn(extra="If", extra_after=0), tmp_path / "if.onnx")
    result = run(path, "--train-layers", "2", "--batch-size", "2", "-o", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "gradient builder" in result.stderr and "'extra_if'" in result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# --------------------------------------------------------------------------------------------
# Faults: Ctrl-C, non-finite batches
# --------------------------------------------------------------------------------------------


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the child: a shell starts background jobs (`cmd &`, nohup) with SIGINT
    ignored, which the child inherits and rightly keeps, so a CI runner launched that way would
    otherwise test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(process: subprocess.Popen, ready: Callable[[], bool], delay: float = 0.0) -> None:
    """Send one SIGINT (what Ctrl-C sends) `delay` seconds after `ready()` first holds."""
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, "finished before it could be interrupted"
        assert time.monotonic() < deadline, "never reached the point to interrupt"
        time.sleep(0.005)
    time.sleep(delay)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGINT)


def test_ctrl_c_during_compile_leaves_nothing(env: dict, tmp_path: Path) -> None:
    # Interrupted once the staging folder exists, i.e. mid-way through writing artifacts.
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gfcompile", env["model"], "--train-layers", "2", "--batch-size", "2", "-o", out]
    process = subprocess.Popen(
        list(map(str, command)), cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal
    )
    _interrupt_when(process, lambda: any(".staging-" in p.name for p in tmp_path.iterdir()))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [], (leftovers, stderr)  # no output, no staging folder, no retired folder


def test_ctrl_c_during_training_keeps_the_last_checkpoint(env: dict, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    command = [
        sys.executable, "-m", "runtime", env["artifacts"], "--data", env["data"], "--steps", "100000",
        "--checkpoint", checkpoint, "--checkpoint-every", "1", "--log-every", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        list(map(str, command)), cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal
    )
    # A few steps after the first checkpoint, so the signal can land while one is being written.
    _interrupt_when(process, checkpoint.exists, delay=0.3)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    # The checkpoint and its integrity record; no temporary files left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.sha256"]
    resumed = Trainer(env["artifacts"], checkpoint=checkpoint)
    step = resumed.step
    assert step >= 1
    weights = {name: resumed.state.parameters[name].data for name in resumed.trainable}
    assert all(np.isfinite(w).all() for w in weights.values())
    result = run(
        env["artifacts"], "--data", env["data"], "--steps", step + 2, "--checkpoint", checkpoint, module="runtime"
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming from {checkpoint} at step {step}" in result.stderr
    assert Trainer(env["artifacts"], checkpoint=checkpoint).step == step + 2


def test_skip_nonfinite_skips_exactly_the_spoiled_batches(env: dict, tmp_path: Path) -> None:
    data = load_data(env["nan"], json.loads((env["artifacts"] / "manifest.json").read_text()), allow_nonfinite=True)
    steps, seed = 12, 5
    skipping = Trainer(env["artifacts"])
    losses = skipping.fit(data, steps=steps, seed=seed, log_every=0, skip_nonfinite=True)

    # Reference: the same batches, with those that hold the NaN sample left out by hand.
    reference = Trainer(env["artifacts"])
    spoiled = []
    for step, (x, y) in zip(range(steps), batches(data, BATCH, seed), strict=False):
        if np.isnan(x).any():
            spoiled.append(step + 1)
            reference.state.properties["step"] = reference.step + 1
        else:
            reference.train_step(x, y)
    assert spoiled and skipping.skipped_steps == spoiled
    assert [i + 1 for i, loss in enumerate(losses) if np.isnan(loss)] == spoiled
    for name in skipping.trainable:
        got = skipping.state.parameters[name].data
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, reference.state.parameters[name].data)

    # Through the CLI: refused without the option, trains and saves finite weights with it.
    refused = run("train", env["artifacts"], "--data", env["nan"], "--steps", steps, "--save", tmp_path / "a")
    assert refused.returncode == 2 and "--skip-nonfinite" in refused.stderr and not (tmp_path / "a").exists()
    trained = run(
        "train", env["artifacts"], "--data", env["nan"], "--steps", steps, "--seed", seed,
        "--save", tmp_path / "b", "--skip-nonfinite",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert f"skipped {len(spoiled)} non-finite batches" in trained.stdout
    saved = Trainer(env["artifacts"], checkpoint=tmp_path / "b")
    for name in saved.trainable:
        np.testing.assert_array_equal(saved.state.parameters[name].data, skipping.state.parameters[name].data)


def test_nan_loss_never_reaches_the_checkpoint(env: dict, tmp_path: Path) -> None:
    trainer = Trainer(env["artifacts"])
    data = load_data(env["data"], trainer.manifest)
    trainer.fit(data, steps=2, log_every=0)
    trainer.save(tmp_path / "good")
    good = tree_digest(tmp_path / "good")
    pre_step = {name: trainer.state.parameters[name].data.copy() for name in trainer.trainable}
    x = np.full((BATCH, *INPUT), np.nan, np.float32)
    with pytest.raises(RunError, match="step 3: the loss is nan; stopping before the weights are updated"):
        trainer.train_step(x, np.zeros(BATCH, np.int64))
    skipped = [trainer.train_step(x, np.zeros(BATCH, np.int64), skip_nonfinite=True) for _ in range(2)]
    assert np.isnan(skipped).all(), skipped
    for name, before_nan in pre_step.items():
        np.testing.assert_array_equal(trainer.state.parameters[name].data, before_nan, err_msg=name)
    trainer.save(tmp_path / "good")  # weights are still the finite ones of step 2
    reloaded = Trainer(env["artifacts"], checkpoint=tmp_path / "good")
    for name in trainer.trainable:
        assert np.isfinite(reloaded.state.parameters[name].data).all()
    # Poisoned weights are refused and the last good checkpoint stays as it was.
    trainer.state.parameters[trainer.trainable[0]] = np.full_like(
        trainer.state.parameters[trainer.trainable[0]].data, np.nan
    )
    before = tree_digest(tmp_path / "good")
    with pytest.raises(RunError, match="holds NaN or Inf; the previous checkpoint is kept"):
        trainer.save(tmp_path / "good")
    assert tree_digest(tmp_path / "good") == before != good  # step 4 saved above, then nothing
    with pytest.raises(RunError, match="compiled initial checkpoint"):
        reloaded.save(env["artifacts"] / "checkpoint")


def test_the_readme_counts_this_table() -> None:
    # The README promises a number; it must be this table's, not a stale one.
    counted = re.search(r"table of (\d+) hostile inputs", (ROOT / "README.md").read_text())
    assert counted is not None and int(counted.group(1)) == len(CASES), (counted and counted.group(1), len(CASES))
