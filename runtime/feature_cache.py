"""Training on cached frozen-prefix features: the prefix runs once per sample, each step runs the tail only.

Artifacts compiled with `gfcompile --feature-cache` hold, besides the whole-graph models, the
frozen prefix as an inference model and the tail's artifacts (gfcompile/prefix_split.py). A
`CachedTrainer` has the Trainer API: it runs the prefix over the training samples once, keeps the
cut tensors (the prefix's outputs) and trains the tail's own Trainer on them, so:

- the data order is the one uncached training sees: batch k is `batches(...)`'s batch k over
  the same sample indices, which depends only on (seed, k);
- checkpoints are the tail Trainer's (its parameters are the whole model's trainable ones), and
  a run resumes from them like any other; they belong to the tail's artifacts, so a checkpoint
  written with the cache resumes with the cache;
- export writes the whole inference model: the prefix followed by the tail's exported model.

The cache lives in a folder (by default beside the checkpoint): `features.bin` holds the cut
tensors of every sample, row after row per cut tensor; `features.json` its key and the sha256
of its content. The key is the sha256 of the prefix model and of the samples as the model sees
them (the data file after preprocessing, so a changed file or a changed preprocessing both
change it), with the cut tensors' names and shapes. A cache whose key differs is rebuilt, never
reused; one whose content no longer matches its sha256 (a corrupted or truncated file) is
rebuilt too. Up to `memory_mb` of features are copied into memory; the rest is read from the
file through a memory map.

Random augmentation would make a sample's features differ between epochs, so it could not be
cached exactly. This runtime has none: preprocessing (runtime/data.py) is a fixed scale, mean
and std. A manifest whose preprocessing asks for a random transform is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from . import checkpoints
from .data import Dataset, eval_batches
from .errors import RunError
from .manifest import MANIFEST, FeatureCacheSpec, Manifest
from .trainer import EvalResult, Trainer, _last_line, ort_quiet, session_options, sha256_file, verified_manifest

CACHE_FORMAT = 1
FEATURES_FILE = "features.bin"
HEADER_FILE = "features.json"
DEFAULT_MEMORY_MB = 1024.0
# Preprocessing entries that would make a sample's input differ from epoch to epoch.
RANDOM_PREPROCESS_KEYS = ("augment", "augmentation", "random_crop", "random_flip", "flip", "crop", "jitter")


@dataclass(frozen=True)
class CacheSettings:
    directory: Path  # where features.bin and features.json live
    memory_mb: float = DEFAULT_MEMORY_MB  # features beyond this stay in the file, read through a memory map


def default_directory(checkpoint: Path) -> Path:
    """The cache folder of a run: beside its checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".features")


def open_run_trainer(
    artifacts: Path, checkpoint: Path | None, lr: float | None, save: Path, args: argparse.Namespace
) -> Trainer:
    """The trainer of a `gftrain` / `gfcompile train` run: a CachedTrainer with --cache-features
    (options declared in runtime/options.py), else the Trainer."""
    settings = cache_settings(args, save)
    if settings is None:
        return Trainer(artifacts, checkpoint=checkpoint, lr=lr)
    return CachedTrainer(artifacts, checkpoint, lr, settings)


def cache_settings(args: argparse.Namespace, save: Path) -> CacheSettings | None:
    """The cache of a run that saves to `save`, from the options in runtime/options.py (None: uncached)."""
    if not args.cache_features:
        return None
    directory = args.cache_dir if args.cache_dir is not None else default_directory(save)
    return CacheSettings(directory, args.cache_memory_mb)


class FeatureStore:
    """The cut tensors of every sample: the first `resident` rows in memory, the rest memory-mapped.

    Indexing with an array of sample indices gives one batch: an array, or a tuple of arrays
    (one per cut tensor) when the cut has several tensors.
    """

    def __init__(self, mapped: list[np.ndarray], resident: int):
        self.mapped = mapped
        self.resident = resident
        self.in_memory = [np.array(array[:resident]) for array in mapped]

    def __len__(self) -> int:
        return len(self.mapped[0])

    def __getitem__(self, index: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        index = np.asarray(index)
        inside = index < self.resident
        batches = []
        for memory, mapped in zip(self.in_memory, self.mapped, strict=True):
            batch = np.empty((len(index), *mapped.shape[1:]), mapped.dtype)
            batch[inside] = memory[index[inside]]
            batch[~inside] = mapped[index[~inside]]
            batches.append(batch)
        return batches[0] if len(batches) == 1 else tuple(batches)


class FeatureCache:
    """Builds, checks and opens the cache of one artifacts folder's prefix."""

    def __init__(self, artifacts: Path, spec: Manifest, settings: CacheSettings, out: TextIO = sys.stderr):
        self.artifacts, self.spec, self.settings, self.out = Path(artifacts), spec, settings, out
        self.split: FeatureCacheSpec = spec.feature_cache
        self._session = None
        self.built = False  # whether the last `open` ran the prefix (False: a valid cache was reused)

    def prefix_session(self):
        import onnxruntime as ort

        if self._session is None:
            ort_quiet()
            path = self.artifacts / self.split.prefix_model
            try:
                self._session = ort.InferenceSession(
                    str(path), session_options(self.spec.session_options), providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime's load errors have no common type
                raise RunError(f"{path}: onnxruntime cannot load the prefix model ({_last_line(exc)})") from None
        return self._session

    def run_prefix(self, x: np.ndarray) -> list[np.ndarray]:
        """The cut tensors of one full batch."""
        session = self.prefix_session()
        return session.run([spec.name for spec in self.split.cut], {session.get_inputs()[0].name: x})

    def key(self, data: Dataset) -> str:
        digest = hashlib.sha256()
        digest.update(self.spec.files[self.split.prefix_model].encode())
        samples = np.ascontiguousarray(data.x)
        digest.update(json.dumps([samples.dtype.str, list(samples.shape)]).encode())
        digest.update(memoryview(samples).cast("B"))
        digest.update(json.dumps([[spec.name, list(spec.shape)] for spec in self.split.cut]).encode())
        return digest.hexdigest()

    def open(self, data: Dataset) -> FeatureStore:
        """The features of `data`: the cache when it was built from this prefix and these samples, else rebuilt."""
        directory = self.settings.directory
        key = self.key(data)
        problem = self._check(key, len(data))
        if problem is not None:
            print(f"feature cache: building {directory} ({problem})", file=self.out, flush=True)
            self._build(data, key)
            self.built = True
        else:
            self.built = False
        layout = self._layout(len(data))
        mapped = [
            np.memmap(directory / FEATURES_FILE, np.float32, "r", offset=offset, shape=shape)
            for offset, shape in layout
        ]
        per_sample = sum(int(np.prod(shape[1:])) * 4 for _, shape in layout)
        resident = min(len(data), int(self.settings.memory_mb * 2**20) // per_sample)
        return FeatureStore(mapped, resident)

    def _layout(self, samples: int) -> list[tuple[int, tuple[int, ...]]]:
        """(byte offset, shape) of each cut tensor's block in features.bin."""
        layout, offset = [], 0
        for spec in self.split.cut:
            shape = (samples, *(int(d) for d in spec.shape[1:]))
            layout.append((offset, shape))
            offset += int(np.prod(shape)) * 4
        return layout

    def _check(self, key: str, samples: int) -> str | None:
        """Why the cache cannot be used (None: it can)."""
        directory = self.settings.directory
        header_path, features = directory / HEADER_FILE, directory / FEATURES_FILE
        if not header_path.is_file() or not features.is_file():
            return "no cache yet"
        try:
            header = json.loads(header_path.read_text())
        except (OSError, ValueError):
            return "its header is unreadable"
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT or header.get("key") != key:
            return "the prefix model or the data changed"
        offset, shape = self._layout(samples)[-1]
        if features.stat().st_size != offset + int(np.prod(shape)) * 4:
            return "the cache file has the wrong size (corrupted)"
        if sha256_file(features) != header.get("sha256"):
            return "the cache file does not match its sha256 (corrupted)"
        return None

    def _build(self, data: Dataset, key: str) -> None:
        directory = self.settings.directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HEADER_FILE).unlink(missing_ok=True)  # a half-built cache is never taken for a valid one
        batch_size = int(self.spec.inputs[0].shape[0])
        layout = self._layout(len(data))
        temporary = directory / (FEATURES_FILE + ".tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.truncate(layout[-1][0] + int(np.prod(layout[-1][1])) * 4)
                start = 0
                for x, _, real in eval_batches(data, batch_size):
                    for (offset, shape), cut in zip(layout, self.run_prefix(x), strict=True):
                        row_bytes = int(np.prod(shape[1:])) * 4
                        handle.seek(offset + start * row_bytes)
                        handle.write(np.ascontiguousarray(cut[:real], dtype=np.float32).tobytes())
                    start += real
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, directory / FEATURES_FILE)
            header = {"format": CACHE_FORMAT, "key": key, "sha256": sha256_file(directory / FEATURES_FILE)}
            (directory / (HEADER_FILE + ".tmp")).write_text(json.dumps(header) + "\n")
            os.replace(directory / (HEADER_FILE + ".tmp"), directory / HEADER_FILE)
        except OSError as exc:
            raise RunError(f"{directory}: cannot write the feature cache ({exc.strerror or exc})") from None
        finally:
            temporary.unlink(missing_ok=True)


def check_cacheable(artifacts: Path, spec: Manifest) -> None:
    """Refuse, in one line, artifacts without a prefix split or whose preprocessing is random."""
    if spec.feature_cache is None:
        raise RunError(
            f"{artifacts}: compiled without --feature-cache, so there is no frozen prefix to cache; "
            "recompile with gfcompile --feature-cache"
        )
    random = [key for key in RANDOM_PREPROCESS_KEYS if (spec.preprocess or {}).get(key)]
    if random:
        raise RunError(
            f"{artifacts}: the preprocessing asks for random {random[0]!r}, so a sample's features differ every "
            "epoch and cannot be cached; train without --cache-features"
        )


class CachedTrainer:
    """The Trainer API over the tail's artifacts, fed with cached prefix features (module docstring)."""

    def __init__(
        self,
        artifacts: Path,
        checkpoint: Path | None = None,
        lr: float | None = None,
        settings: CacheSettings | None = None,
        out: TextIO = sys.stderr,
        backend: type[Trainer] = Trainer,
    ):
        self.artifacts = Path(artifacts)
        self.spec = verified_manifest(self.artifacts)
        check_cacheable(self.artifacts, self.spec)
        self.manifest = self.spec.to_json()
        # `backend`: Trainer picks the training build where installed; runtime.portable.PortableTrainer forces the other.
        self.tail = backend(self.artifacts / self.spec.feature_cache.tail, checkpoint=checkpoint, lr=lr)
        self.settings = settings or CacheSettings(default_directory(self.artifacts / "trained_checkpoint"))
        self.cache = FeatureCache(self.artifacts, self.spec, self.settings, out)
        # Cache folder -> (the samples it was opened for, their features): each dataset's cache is opened once.
        self._stores: dict[Path, tuple[np.ndarray, FeatureStore]] = {}

    # The tail Trainer holds the state: step, checkpoints, the optimizer.
    def __getattr__(self, name: str):
        if name == "tail":  # not yet set: __init__ failed part-way
            raise AttributeError(name)
        return getattr(self.tail, name)

    @property
    def run_start(self) -> int | None:
        return self.tail.run_start

    @run_start.setter
    def run_start(self, value: int | None) -> None:
        self.tail.run_start = value

    def features(self, data: Dataset, settings: CacheSettings | None = None) -> Dataset:
        """`data` with its inputs replaced by their cut tensors, cached in `settings`' folder (default: the
        training cache's), opened once per dataset. Give each dataset its own folder: a folder holds one."""
        settings = settings or self.settings
        opened = self._stores.get(settings.directory)
        if opened is None or opened[0] is not data.x:
            cache = (
                self.cache
                if settings == self.settings
                else FeatureCache(self.artifacts, self.spec, settings, self.cache.out)
            )
            opened = self._stores[settings.directory] = (data.x, cache.open(data))
        return Dataset(x=opened[1], y=data.y)

    def fit(self, data: Dataset, steps: int, **options) -> list[float]:
        return self.tail.fit(self.features(data), steps, **options)

    def outputs(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        cut = self.cache.run_prefix(x)
        return self.tail.outputs(cut[0] if len(cut) == 1 else tuple(cut), y)

    def evaluate(self, data: Dataset, cache: CacheSettings | None = None) -> EvalResult:
        """Loss and accuracy on `data`: the prefix runs on every batch, or, with `cache` (a folder other than
        the training set's), once per sample into that cache, and each evaluation then runs the tail only."""
        if cache is None:
            return Trainer.evaluate(self, data)
        return self.tail.evaluate(self.features(data, cache))

    def protected_files(self) -> set[Path]:
        """The manifest and every file it lists, the tail's included."""
        return {(self.artifacts / name).resolve() for name in [MANIFEST, *self.spec.files]}

    def check_save_path(self, checkpoint: Path) -> None:
        """The tail's checks, and no file of the whole artifacts may be written over either."""
        written = [Path(checkpoint), checkpoints.record_path(Path(checkpoint))]
        clash = next((path for path in written if path.resolve() in self.protected_files()), None)
        if clash is not None:
            raise RunError(
                f"{checkpoint}: would overwrite {clash.name} of the artifacts in {self.artifacts}; "
                "save the trained weights to another path"
            )
        self.tail.check_save_path(checkpoint)

    def export_inference(self, path: Path) -> Path:
        """The whole inference model: the prefix, then the tail's exported model with the trained weights.

        On the portable backend, whose devices have onnxruntime but no onnx package to join models
        with, the whole graph's inference template takes the tail's trained weights instead.
        """
        from .portable import PortableTrainer, write_inference_model

        if isinstance(self.tail, PortableTrainer):
            if self.spec.portable is None:
                raise RunError(f"{self.artifacts}: the whole model has no portable inference template to export")
            return write_inference_model(self.artifacts, self.spec.portable, self.tail.parameters(), path)
        import onnx

        path = Path(path)
        tail_path = path.with_name(path.name + ".tail.onnx")
        try:
            self.tail.export_inference(tail_path)
            prefix = onnx.load(str(self.artifacts / self.spec.feature_cache.prefix_model))
            tail = onnx.load(str(tail_path))
        finally:
            tail_path.unlink(missing_ok=True)
        merged = joined_models(prefix, tail)
        try:
            onnx.save(merged, str(path))
        except OSError as exc:
            raise RunError(f"{path}: cannot write the inference model ({exc.strerror or exc})") from None
        return path


def joined_models(prefix, tail):
    """One model computing `tail` on `prefix`'s outputs (the cut tensors, which the tail takes by name)."""
    from onnx import helper

    names = {init.name for init in prefix.graph.initializer}
    initializers = [*prefix.graph.initializer, *(i for i in tail.graph.initializer if i.name not in names)]
    graph = helper.make_graph(
        [*prefix.graph.node, *tail.graph.node],
        tail.graph.name,
        list(prefix.graph.input),
        list(tail.graph.output),
        initializers,
    )
    opsets = {entry.domain: entry.version for entry in [*tail.opset_import, *prefix.opset_import]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(prefix.ir_version, tail.ir_version)
    model.metadata_props.extend(prefix.metadata_props)
    return model
