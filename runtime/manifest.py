"""The manifest of an artifacts folder or bundle: its one typed definition, read and written here.

The compiler builds a `Manifest` (gfcompile/pipeline.py) and writes `Manifest.to_json()`; every
reader (the runtime trainer, `gfcompile diff`, `inspect` and `bundle`) goes through
`Manifest.from_json`, which checks types, shapes and value ranges, not only that keys exist. A
manifest that is valid JSON with the wrong structure is refused with one line naming the field:

    manifest.json: plan.row_tiles: expected an integer, got the string '4'

Unknown top-level keys (and unknown keys of "bundle") are kept as they are, so a newer writer of
the same format version can add entries; an unknown `format_version` is refused before anything
else is read. `canonical_bytes` / `manifest_sha256` are what a signature or a checkpoint's
record covers: the same manifest always gives the same bytes, whatever its key order or spacing.

Standard library and numpy only: this module ships to devices with the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from .errors import RunError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MODEL_ROLES = ("training", "eval", "optimizer")
DEFAULT_MODELS = {role: f"{role}_model.onnx" for role in MODEL_ROLES}
INITIAL_CHECKPOINT = "checkpoint"
CLASSIFICATION_LOSSES = ("cross_entropy", "pixel_cross_entropy")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Far above any compiled manifest (a 500-layer model's is well under 1 MiB): a bigger file is not read.
MAX_MANIFEST_BYTES = 64 << 20
# A compiled manifest nests about 5 levels; free-form entries (config, metadata) are capped too, so
# no reader (serialising, hashing, diffing) recurses past Python's stack.
MAX_NESTING = 32
# Optional sections that some manifests lack entirely (rather than recording null): written only when present.
_SECTION = {"omit_when_absent": True}


class ManifestError(RunError):
    """A manifest that is not what this runtime reads, as `<file>: <field>: <problem>`."""

    def __init__(self, field_path: str, problem: str, source: str = MANIFEST):
        self.field_path, self.problem = field_path, problem
        where = f"{field_path}: " if field_path else ""
        super().__init__(f"{source}: {where}{problem}")


class _Invalid(RunError):
    """A field that is wrong; `path` grows as it propagates out of nested values.

    Readers turn it into a ManifestError naming the file; raised while the compiler constructs a
    manifest (a value it should never produce), it is still one line naming the field.
    """

    def __init__(self, path: str, problem: str):
        super().__init__(f"manifest: {path}: {problem}")
        self.path, self.problem = path, problem


def _require(condition: bool, field_name: str, problem: str) -> None:
    if not condition:
        raise _Invalid(field_name, problem)


def _sha256_hex(value: str, field_name: str) -> None:
    _require(bool(_SHA256.fullmatch(value)), field_name, f"expected 64 lowercase hex digits, got {value!r}")


def _safe_file_name(name: str, field_name: str) -> None:
    """A path inside the folder: relative, no '..', so a manifest cannot point the runtime elsewhere."""
    path = PurePosixPath(name)
    _require(
        bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and "\0" not in name,
        field_name,
        f"{name!r} is not a file name inside the folder",
    )


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, shape (static dims, or a symbolic name), numpy dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        for axis, dim in enumerate(self.shape):
            if isinstance(dim, int):
                _require(dim >= 1, f"shape[{axis}]", f"dimensions must be >= 1, got {dim}")
            else:
                _require(bool(dim), f"shape[{axis}]", "a symbolic dimension must have a name")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        _require(
            dtype is not None and dtype.name == self.dtype and dtype.kind in "biuf",
            "dtype",
            f"{self.dtype!r} is not a numeric numpy dtype name",
        )

    @property
    def static(self) -> bool:
        return all(isinstance(dim, int) for dim in self.shape)


@dataclass(frozen=True)
class SourceSpec:
    path: str
    sha256: str

    def __post_init__(self) -> None:
        _sha256_hex(self.sha256, "sha256")


@dataclass(frozen=True)
class PassesSpec:
    """The compiler's passes by stage, in the order they ran (see passes/base.py)."""

    legalize: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    training: tuple[str, ...] = ()
    lower: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanSpec:
    """What trains: the compiler's plan (passes.base.Plan), as recorded."""

    trainable_convs: tuple[str, ...]
    filtered: dict[str, int]
    trainable_params: tuple[str, ...]
    frozen_params: tuple[str, ...]
    bn_mode: Literal["eval", "train", "frozen"] = "eval"
    paper_stride_scaling: bool = False
    row_tiles: int = 0
    row_strategy: Literal["overl", "2ps"] = "overl"
    row_tile_trainable: bool = False
    # Convs whose global --patch-size was larger than their output map, with the r they got.
    fitted_patch_sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, r in self.filtered.items():
            _require(r >= 1, f"filtered[{name!r}]", f"patch size must be >= 1, got {r}")
        _require(self.row_tiles == 0 or self.row_tiles >= 2, "row_tiles", f"must be 0 or >= 2, got {self.row_tiles}")
        for field_name in ("trainable_convs", "trainable_params", "frozen_params"):
            names = getattr(self, field_name)
            _require(all(names), field_name, "names must not be empty")
            _require(len(set(names)) == len(names), field_name, "names must be unique")
        both = sorted(set(self.trainable_params) & set(self.frozen_params))
        _require(not both, "frozen_params", f"{both[0] if both else ''!r} is also in trainable_params")
        unknown = sorted(set(self.filtered) - set(self.trainable_convs))
        _require(not unknown, "filtered", f"{unknown[0] if unknown else ''!r} is not in trainable_convs")


@dataclass(frozen=True)
class OptimizerSpec:
    type: Literal["adamw", "sgd"]
    lr: float
    momentum: float | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number, got {self.lr}")
        if self.momentum is not None:
            _require(
                math.isfinite(self.momentum) and 0 <= self.momentum < 1,
                "momentum",
                f"must be in [0, 1), got {self.momentum}",
            )
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            f"must be >= 0, got {self.weight_decay}",
        )


@dataclass(frozen=True)
class SessionOptionsSpec:
    """The onnxruntime session options the artifacts need (row tiling turns the arena and reuse off)."""

    graph_optimization_level: Literal[
        "ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"
    ] = "ORT_ENABLE_ALL"
    execution_order: Literal["DEFAULT", "PRIORITY_BASED", "MEMORY_EFFICIENT"] = "DEFAULT"
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    enable_mem_reuse: bool = True


@dataclass(frozen=True)
class LayersSpec:
    """The compile-time per-layer cost table (gfcompile/summary.py), kept for reports."""

    rows: tuple[dict[str, Any], ...] = ()
    totals: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleSpec:
    """What `gfcompile bundle` adds: the model files to load (".ort" or ".onnx") and the initial checkpoint."""

    format: Literal["onnx", "ort"]
    models: dict[str, str]
    initial_checkpoint: str = INITIAL_CHECKPOINT
    extra: dict[str, Any] = field(default_factory=dict)  # the bundle writer's own entries, kept as they are

    def __post_init__(self) -> None:
        for role, name in self.models.items():
            _require(
                role in MODEL_ROLES, f"models[{role!r}]", f"unknown model role (expected {', '.join(MODEL_ROLES)})"
            )
            _safe_file_name(name, f"models[{role!r}]")
        _safe_file_name(self.initial_checkpoint, "initial_checkpoint")


@dataclass(frozen=True)
class PortableStateSpec:
    """One optimizer state tensor of a parameter group: its train-step input and updated output."""

    name: str
    input: str
    output: str


@dataclass(frozen=True)
class PortableParameterSpec:
    """A trainable parameter of the portable train step: its input and updated output."""

    name: str
    input: str
    output: str


@dataclass(frozen=True)
class PortableGroupSpec:
    """Parameters the optimizer updates together (laid end to end when several), and their state."""

    parameters: tuple[str, ...]
    state: tuple[PortableStateSpec, ...] = ()


@dataclass(frozen=True)
class PortableSpec:
    """The portable artifacts (gfcompile/train_step.py), which train on plain onnxruntime: their
    files and the train step's input/output names. `inference_patches` gives, per trainable
    parameter, the [offset, length] of its bytes in the inference template."""

    train_step: str
    eval_step: str
    inference_template: str
    frozen_data: str
    checkpoint: str
    data_inputs: tuple[str, ...]
    label_input: str
    loss_output: str
    model_outputs: tuple[str, ...]
    step_input: str
    lr_input: str
    gradient_norm_output: str
    parameters: tuple[PortableParameterSpec, ...]
    optimizer: dict[str, Any]
    groups: tuple[PortableGroupSpec, ...] = ()  # the optimizer's parameter groups and their state
    inference_patches: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("train_step", "eval_step", "inference_template", "frozen_data", "checkpoint"):
            _safe_file_name(getattr(self, key), key)
        for name, patch in self.inference_patches.items():
            _require(
                len(patch) == 2 and all(v >= 0 for v in patch),
                f"inference_patches[{name!r}]",
                "expected [offset, length]",
            )


@dataclass(frozen=True)
class FeatureCacheSpec:
    """The frozen-prefix split (gfcompile/prefix_split.py): the prefix inference model, the folder of
    the tail's artifacts (a full artifacts folder with its own manifest, whose inputs are `cut`),
    and the cut tensors the prefix outputs."""

    prefix_model: str
    tail: str
    cut: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        _safe_file_name(self.prefix_model, "prefix_model")
        _safe_file_name(self.tail, "tail")
        _require(len(self.cut) >= 1, "cut", "must list at least one tensor")
        for index, spec in enumerate(self.cut):
            _require(spec.static, f"cut[{index}].shape", f"expected static dims, got {list(spec.shape)}")


@dataclass(frozen=True)
class Manifest:
    format_version: int
    source: SourceSpec
    plan: PlanSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    loss: Literal["cross_entropy", "pixel_cross_entropy", "mse"]
    optimizer: OptimizerSpec
    labels: tuple[TensorSpec, ...] = ()
    ignore_index: int | None = None
    gfcompile_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the CompileConfig as the compiler recorded it
    versions: dict[str, str] = field(default_factory=dict)
    passes: PassesSpec = field(default_factory=PassesSpec)
    session_options: SessionOptionsSpec = field(default_factory=SessionOptionsSpec)
    preprocess: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    layers: LayersSpec | None = field(default=None, metadata=_SECTION)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, written last
    bundle: BundleSpec | None = field(default=None, metadata=_SECTION)
    portable: PortableSpec | None = field(default=None, metadata=_SECTION)
    # Static shapes the compiler measured for layer tensors that eval_model.onnx leaves symbolic (e.g.
    # after a channel shuffle's Reshape); `gfcompile inspect` reads them. Tensor name -> dims.
    shapes: dict[str, tuple[int, ...]] | None = field(default=None, metadata=_SECTION)
    feature_cache: FeatureCacheSpec | None = field(default=None, metadata=_SECTION)
    extra: dict[str, Any] = field(default_factory=dict)  # entries this runtime does not read, kept as they are

    def __post_init__(self) -> None:
        _require(
            self.format_version == FORMAT_VERSION,
            "format_version",
            f"manifest format {self.format_version} is not {FORMAT_VERSION}; recompile with this gfcompile version",
        )
        _require(len(self.inputs) >= 1, "inputs", "must list the model's data input")
        _require(len(self.outputs) >= 1, "outputs", "must list the model's output")
        data = self.inputs[0]
        _require(
            data.static and len(data.shape) >= 2,
            "inputs[0].shape",
            f"expected static (N, ...) dims, got {list(data.shape)}",
        )
        for index, label in enumerate(self.labels):
            _require(label.static, f"labels[{index}].shape", f"expected static dims, got {list(label.shape)}")
        batch = data.shape[0]
        for group in ("labels", "outputs"):
            for index, spec in enumerate(getattr(self, group)):
                _require(
                    bool(spec.shape) and spec.shape[0] == batch,
                    f"{group}[{index}].shape",
                    f"batch dimension {spec.shape[0] if spec.shape else None} differs from the input's {batch}",
                )
        if self.loss in CLASSIFICATION_LOSSES:
            logits = self.outputs[0].shape
            _require(
                len(logits) >= 2 and isinstance(logits[1], int),
                "outputs[0].shape",
                f"a {self.loss} model needs static (N, classes, ...) logits, got {list(logits)}",
            )
        for name, digest in self.files.items():
            _safe_file_name(name, f"files[{name!r}]")
            _sha256_hex(digest, f"files[{name!r}]")
        if self.preprocess is not None:
            _check_preprocess(self.preprocess)

    # ---- derived views the readers share

    @property
    def batch_size(self) -> int:
        return int(self.inputs[0].shape[0])

    def model_files(self) -> dict[str, str]:
        """Which files hold the training, eval and optimizer models ("*.ort" in an ORT-format bundle)."""
        return {**DEFAULT_MODELS, **(self.bundle.models if self.bundle else {})}

    # ---- JSON

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST) -> Manifest:
        """Check and convert a parsed manifest; a ManifestError names the first field that is wrong."""
        if not isinstance(data, dict):
            raise ManifestError("", f"expected a JSON object, got {_json_kind(data)}", source)
        # The version decides how everything else is read, so it is checked before anything else.
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ManifestError(
                "format_version",
                f"manifest format {version!r} is not {FORMAT_VERSION}; recompile with this gfcompile version",
                source,
            )
        depth = nesting_depth(data)
        if depth > MAX_NESTING:
            raise ManifestError("", f"nested too deeply ({depth} levels; a manifest has at most {MAX_NESTING})", source)
        try:
            return _convert(data, cls, "")
        except _Invalid as exc:
            raise ManifestError(exc.path, exc.problem, source) from None

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


def _check_preprocess(spec: dict[str, Any]) -> None:
    """The fields runtime/data.py reads; other keys a model's metadata carries are kept."""
    scale = spec.get("scale", 1.0)
    _require(_is_number(scale) and scale > 0, "preprocess.scale", f"must be a positive number, got {scale!r}")
    for key in ("mean", "std"):
        values = spec.get(key, [1.0])
        values = values if isinstance(values, list) else [values]
        _require(
            bool(values) and all(_is_number(v) for v in values),
            f"preprocess.{key}",
            "must be a number or a list of numbers",
        )
        if key == "std":
            _require(all(v > 0 for v in values), "preprocess.std", "must be positive")
    layout = spec.get("layout", "NCHW")
    _require(
        isinstance(layout, str) and layout.upper() in ("NCHW", "NHWC"),
        "preprocess.layout",
        f"must be NCHW or NHWC, got {layout!r}",
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_manifest(directory: Path) -> Manifest:
    """Read and check `directory/manifest.json` (a folder written by gfcompile, or a bundle)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise RunError(f"{directory}: no {MANIFEST}; is this a gfcompile artifacts folder?")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise RunError(f"{path}: {path.stat().st_size >> 20} MiB, too large for a gfcompile manifest")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise RunError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, too-deep nesting, huge ints
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise RunError(f"{path}: corrupted manifest (not JSON: {problem})") from None
    manifest = Manifest.from_json(data, str(path))
    files = manifest.files
    needed = [
        *manifest.model_files().values(),
        manifest.bundle.initial_checkpoint if manifest.bundle else INITIAL_CHECKPOINT,
    ]
    missing = [name for name in needed if name not in files]
    if missing:
        raise ManifestError("files", f"lists no sha256 for {', '.join(missing)}", str(path))
    return manifest


def canonical_bytes(manifest: Manifest | dict[str, Any]) -> bytes:
    """The manifest as UTF-8 JSON with sorted keys and no spacing: what a hash or signature covers."""
    data = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def manifest_sha256(manifest: Manifest | dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


# --------------------------------------------------------------------------------------------------
# JSON <-> dataclasses, driven by the type hints above


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in `value`, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_EXPECTED = {int: "an integer", str: "a name", float: "a number", bool: "true or false"}


def _join(parent: str, child: str) -> str:
    if not parent:
        return child
    return f"{parent}{child}" if child.startswith("[") else f"{parent}.{child}"


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except _Invalid as exc:
                errors.append(exc)
        if len(options) == 1:
            raise errors[0]
        expected = " or ".join(_EXPECTED.get(option, str(option)) for option in options)
        raise _Invalid(path, f"expected {expected}, got {_json_kind(value)}")
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise _Invalid(path, f"expected one of {', '.join(map(repr, args))}, got {_json_kind(value)}")
        return value
    if dataclasses.is_dataclass(hint):
        return _convert_dataclass(value, hint, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise _Invalid(path, f"expected true or false, got {_json_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"expected an integer, got {_json_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(path, f"expected a number, got {_json_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _Invalid(path, f"expected a string, got {_json_kind(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {_json_kind(value)}")
        return tuple(_convert(item, args[0], f"{path}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(path, f"expected an object, got {_json_kind(value)}")
        return {key: _convert(item, args[1], f"{path}[{key!r}]") for key, item in value.items()}
    raise TypeError(f"manifest field type {hint!r} has no JSON reader")  # a bug in this module, not in the input


def _convert_dataclass(value: Any, cls: type, path: str) -> Any:
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected an object, got {_json_kind(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = [name for name in fields if name != "extra"]  # in declaration order: the first missing is named
    unknown = [key for key in value if key not in known]
    if unknown and "extra" not in fields:
        raise _Invalid(_join(path, unknown[0]), "unknown entry")
    arguments: dict[str, Any] = {}
    for name in known:
        if name in value:
            arguments[name] = _convert(value[name], hints[name], _join(path, name))
        elif fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING:
            raise _Invalid(_join(path, name), "missing")
    if "extra" in fields:
        arguments["extra"] = {key: value[key] for key in unknown}
    try:
        return cls(**arguments)
    except _Invalid as exc:
        raise _Invalid(_join(path, exc.path), exc.problem) from None


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        data = {}
        for item in dataclasses.fields(value):
            if item.name == "extra":
                data.update(_to_json(getattr(value, item.name)))
            elif getattr(value, item.name) is None and item.metadata.get("omit_when_absent"):
                continue
            else:
                data[item.name] = _to_json(getattr(value, item.name))
        return data
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value
