"""`gfcompile bundle`: a folder (or .tar.gz) of data to copy onto a device and train there.

The bundle holds the training, eval and optimizer models, the initial checkpoint, a README for the
device, the manifest (the compile manifest plus a "bundle" entry: which model files to load, what
the device needs), `SHA256SUMS` over every one of those files, the manifest included, and with
`--sign-key` an Ed25519 signature of SHA256SUMS. Artifacts compiled with `--feature-cache` add
the frozen prefix model and the tail's artifacts folder (`feature_tail/`, with its own manifest),
listed in SHA256SUMS by their paths, so `gftrain BUNDLE --cache-features` trains there too. It
holds no code: the device runs the installed runtime (`pip install gfcompile-runtime`, see
runtime/pyproject.toml), which verifies the bundle
against SHA256SUMS and, given `--trusted-key`, the signature before it loads anything (see
runtime/bundle.py). Signing uses `cryptography`'s Ed25519 rather than OpenSSF model-signing: that
package resolves beside our pins, but brings sigstore, tuf, pydantic and a dozen more packages
onto devices whose runtime otherwise needs only numpy and onnxruntime-training.

`--ort-format` ships the training and optimizer models in ORT format (what ORT's minimal and
mobile builds load; onnxruntime-training 1.19's Module trains from them). The eval model stays
.onnx: `Module.export_model_for_inferencing` parses the eval model as ONNX protobuf and fails on
an .ort file, and the inference export is part of the device workflow.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from runtime import signing
from runtime.bundle import CHECKSUMS, DEFAULT_MODELS, INITIAL_CHECKPOINT, SIGNATURE, checksums_text
from runtime.errors import RunError
from runtime.trainer import load_manifest

from . import __version__
from .errors import GfError
from .output import (
    MANIFEST,
    check_output_dir,
    file_hashes,
    publish,
    staging_directory,
    write_file_atomically,
)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
RUNTIME_REQUIREMENTS = [
    "gfcompile-runtime (onnxruntime-training-cpu==1.19.2, numpy)",
    "its [images] extra (Pillow) for image folders",
    "its [signing] extra (cryptography) for --trusted-key",
]


def make_bundle(
    artifacts: Path,
    output: Path,
    ort_format: bool = False,
    preprocess: dict | None = None,
    force: bool = False,
    sign_key: Path | None = None,
) -> Path:
    """Write a bundle folder, or a .tar.gz when `output` ends that way, and return its path.

    With `sign_key` (an Ed25519 PEM private key) SHA256SUMS is signed into SHA256SUMS.sig.
    """
    artifacts, output = Path(artifacts), Path(output)
    try:
        manifest = load_manifest(artifacts, verify=True)
        if sign_key is not None:
            signing.sign(b"", Path(sign_key))  # a bad key fails here, before any file is written
    except RunError as exc:
        raise GfError(str(exc)) from None
    missing = [name for name in [*DEFAULT_MODELS.values(), INITIAL_CHECKPOINT] if not (artifacts / name).is_file()]
    if missing:
        raise GfError(f"{artifacts}: {', '.join(missing)} missing; bundle a folder written by gfcompile")
    if preprocess is not None:
        manifest["preprocess"] = check_preprocess(preprocess, manifest)
    archive = output.name.endswith(ARCHIVE_SUFFIXES)
    if archive:
        if output.exists() and not force:
            raise GfError(f"{output}: exists; pass --force to replace it")
        if output.is_dir():
            raise GfError(f"{output}: is a directory, expected an archive name")
        name = output.name[: -len(next(s for s in ARCHIVE_SUFFIXES if output.name.endswith(s)))]
        with staging_directory(output) as staging:
            folder = staging / name
            folder.mkdir()
            _fill(folder, artifacts, manifest, ort_format, sign_key)

            def pack(temporary: Path) -> None:
                with tarfile.open(temporary, "w:gz") as tar:
                    tar.add(folder, arcname=name)

            write_file_atomically(output, pack, force=force)
            shutil.rmtree(staging)  # the folder was only the archive's source
        return output
    check_output_dir(output, force)
    with staging_directory(output) as staging:
        _fill(staging, artifacts, manifest, ort_format, sign_key)
        publish(staging, output, force=force)
    return output


def check_preprocess(spec: dict, manifest: dict) -> dict:
    """Validate a preprocessing record: scale, per-channel mean/std, layout."""
    if not isinstance(spec, dict):
        raise GfError('--preprocess must be a JSON object like {"scale": 0.00392, "mean": [0.5], "std": [0.25]}')
    unknown = set(spec) - {"scale", "mean", "std", "layout", "dtype"}
    if unknown:
        raise GfError(f"--preprocess has unknown keys {sorted(unknown)} (scale, mean, std, layout)")
    layout = str(spec.get("layout", "NCHW")).upper()
    if layout not in ("NCHW", "NHWC"):
        raise GfError(f"--preprocess layout must be NCHW or NHWC, got {layout!r}")
    shape = manifest["inputs"][0]["shape"]
    channels = shape[1] if layout == "NCHW" else shape[-1]
    checked: dict = {"scale": spec.get("scale", 1.0 / 255.0), "layout": layout, "dtype": "uint8"}
    if not isinstance(checked["scale"], (int, float)) or checked["scale"] <= 0:
        raise GfError(f"--preprocess scale must be a positive number, got {checked['scale']!r}")
    for key, default in (("mean", 0.0), ("std", 1.0)):
        values = spec.get(key, [default])
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, (int, float)) for v in values) or len(values) not in (1, channels):
            raise GfError(f"--preprocess {key} must be 1 or {channels} numbers, got {spec.get(key)!r}")
        if key == "std" and any(v <= 0 for v in values):
            raise GfError("--preprocess std must be positive")
        checked[key] = [float(v) for v in values]
    return checked


def _fill(folder: Path, artifacts: Path, manifest: dict, ort_format: bool, sign_key: Path | None) -> None:
    bundle_manifest = _bundled_manifest(artifacts, folder, manifest, ort_format)
    split = manifest.get("feature_cache")
    if split:
        shutil.copy2(artifacts / split["prefix_model"], folder / split["prefix_model"])
        _fill_tail(artifacts / split["tail"], folder / split["tail"], ort_format)
    bundle_manifest["bundle"].update(
        artifacts_manifest_sha256=_sha256(artifacts / MANIFEST), requires=RUNTIME_REQUIREMENTS
    )
    (folder / "README.md").write_text(_readme(bundle_manifest))
    bundle_manifest["files"] = file_hashes(folder)
    (folder / MANIFEST).write_text(json.dumps(bundle_manifest, indent=2) + "\n")
    # SHA256SUMS covers every file, the manifests included: an edited learning rate fails the
    # check like a flipped model byte, in the tail's folder as at the top.
    listing = checksums_text(_every_file_hash(folder)).encode()
    (folder / CHECKSUMS).write_bytes(listing)
    if sign_key is not None:
        try:
            (folder / SIGNATURE).write_bytes(signing.sign(listing, Path(sign_key)))
        except RunError as exc:
            raise GfError(str(exc)) from None
    folder.chmod(0o755)


def _bundled_manifest(source: Path, target: Path, manifest: dict, ort_format: bool) -> dict:
    """Copies one artifacts folder's models; its manifest without the file hashes, plus the bundle
    entry that says which model files a device loads."""
    bundled = {key: value for key, value in manifest.items() if key != "files"}
    bundled["bundle"] = {
        "format": "ort" if ort_format else "onnx",
        "models": _copy_models(source, target, manifest, ort_format),
        "initial_checkpoint": INITIAL_CHECKPOINT,
        "made_by": f"gfcompile {__version__}",
    }
    return bundled


def _copy_models(source: Path, target: Path, manifest: dict, ort_format: bool) -> dict[str, str]:
    """Copy one artifacts folder's models and initial checkpoint; returns the model file of each role."""
    models = dict(DEFAULT_MODELS)
    shutil.copy2(source / DEFAULT_MODELS["eval"], target / DEFAULT_MODELS["eval"])
    shutil.copy2(source / INITIAL_CHECKPOINT, target / INITIAL_CHECKPOINT)
    # The portable files (gfcompile/train_step.py) let the bundle train on plain onnxruntime too.
    for name in portable_files(manifest):
        shutil.copy2(source / name, target / name)
    for role in ("training", "optimizer"):
        model = source / DEFAULT_MODELS[role]
        if ort_format:
            models[role] = model.with_suffix(".ort").name
            _to_ort_format(model, target / models[role], manifest)
        else:
            shutil.copy2(model, target / models[role])
    return models


def _fill_tail(source: Path, target: Path, ort_format: bool) -> None:
    """The feature cache's tail (runtime/feature_cache.py) as an artifacts folder inside the bundle.

    Its manifest, checked against its own files first, gains the bundle entry that says which
    model files to load, so an ORT-format bundle trains the tail from .ort models too.
    """
    try:
        manifest = load_manifest(source, verify=True)
    except RunError as exc:
        raise GfError(f"the feature cache's tail: {exc}") from None
    target.mkdir()
    tail_manifest = _bundled_manifest(source, target, manifest, ort_format)
    tail_manifest["files"] = file_hashes(target)
    (target / MANIFEST).write_text(json.dumps(tail_manifest, indent=2) + "\n")
    try:
        load_manifest(target, verify=True)  # the runtime's reader accepts what the device will read
    except RunError as exc:
        raise GfError(f"internal error: the bundled tail's manifest does not check ({exc})") from None
    target.chmod(0o755)


def _every_file_hash(folder: Path) -> dict[str, str]:
    """The sha256 of every file under `folder`, by its '/'-separated path (what `sha256sum -c` reads)."""
    return {path.relative_to(folder).as_posix(): _sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def portable_files(manifest: dict) -> list[str]:
    """The files of the manifest's "portable" entry (none for artifacts compiled without one)."""
    portable = manifest.get("portable")
    if not portable:
        return []
    return [portable[key] for key in ("train_step", "eval_step", "inference_template", "frozen_data", "checkpoint")]


def _sha256(path: Path) -> str:
    from runtime.trainer import sha256_file

    return sha256_file(path)


def _to_ort_format(source: Path, target: Path, manifest: dict) -> None:
    """Save `source` in ORT format, as onnxruntime's converter does (optimizations fixed at save time).

    The NCHWc layout transformer is disabled: it writes x86-specific kernels into the model, and
    the bundle is for any CPU (ARM boards, phones).
    """
    import onnxruntime as ort

    level = manifest.get("session_options", {}).get("graph_optimization_level", "ORT_ENABLE_ALL")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    try:
        ort.InferenceSession(
            str(source),
            sess_options=options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["NchwcTransformer"],
        )
    except Exception as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GfError(f"{source.name}: onnxruntime cannot save it in ORT format ({message})") from None
    if not target.is_file():
        raise GfError(f"{source.name}: onnxruntime wrote no ORT-format model")


def _cache_text(manifest: dict) -> str:
    if not manifest.get("feature_cache"):
        return ""
    return """`--cache-features` runs the frozen prefix (`prefix_model.onnx`) once per sample and trains the
tail (`feature_tail/`) on its cached outputs: the same weights, steps several times faster. The
cache lives beside the checkpoint (`trained_checkpoint.features/`, or `CHECKPOINT.features` with
`--checkpoint`; `--cache-dir` to choose), is rebuilt when the data or the prefix changes, and keeps
`--cache-memory-mb` of features in memory. A checkpoint written with the cache resumes with it.

"""


def _readme(manifest: dict) -> str:
    bundle = manifest["bundle"]
    shape = manifest["inputs"][0]["shape"]
    classes = manifest["outputs"][0]["shape"][1] if len(manifest["outputs"][0]["shape"]) > 1 else "?"
    preprocess = manifest.get("preprocess")
    if preprocess:
        prep = (
            f"uint8 pixels x become `(x * {preprocess.get('scale')} - mean) / std` with mean "
            f"{preprocess.get('mean')} and std {preprocess.get('std')} ({preprocess.get('layout', 'NCHW')})."
        )
    else:
        prep = "none recorded: give float32 data that is already normalised (or re-bundle with --preprocess)."
    return f"""# gfcompile device bundle

Made by {bundle["made_by"]} ({bundle["format"]} models). Copy this whole folder to the device.

## Needs

Python 3.10 or 3.11 with the gfcompile runtime installed: {"; ".join(bundle["requires"])}. Build its
wheel from the gfcompile sources with `pip wheel --no-deps ./runtime -w dist/`, copy it over, and
`pip install "./gfcompile_runtime-0.1.0-py3-none-any.whl[images,signing]"`. No torch, no onnx-graphsurgeon. This
folder holds data only; the installed runner checks it and never imports anything from it.

## Train

    gftrain THIS_FOLDER --data DATA --steps 500 --checkpoint-every 10 --export model.onnx [--trusted-key KEY.pub]

Run `gftrain` (or `python -I -m runtime`) from any folder; plain `python -m runtime` run from inside
this folder would put the folder on Python's import path. DATA is an `.npz` with arrays `x` (N,
{", ".join(str(d) for d in shape[1:])}) and `y`, or a folder with one subfolder of images per class (`0/`, `1/`, ... or class
names, sorted). Images are converted to the input's channel count and resized to its height and
width. The model has {classes} classes and trains on batches of {shape[0]}.

Preprocessing: {prep}

Before loading anything the runner checks every file against `SHA256SUMS` (the manifest
included), refuses files that it does not list, and with `--trusted-key KEY.pub` checks the
Ed25519 signature `SHA256SUMS.sig` against that key; without it, it prints a notice. Without Python:
`sha256sum -c SHA256SUMS` and `openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in SHA256SUMS
-sigfile SHA256SUMS.sig`. `checkpoint` is the shipped initial state and is never written;
training goes to `trained_checkpoint` (or `--checkpoint PATH`), replaced atomically every
`--checkpoint-every` steps. After a crash or power loss, run the same command again: it resumes at
the last checkpoint and stops at `--steps` in total, with no lost or repeated steps.

{_cache_text(manifest)}`--export model.onnx` writes an inference model (batch {shape[0]}, standard ONNX ops only) that plain
`onnxruntime` runs; the runner checks it against the trained eval model before keeping it.

Session options the runtime uses: {json.dumps(manifest.get("session_options", {}))}
"""
