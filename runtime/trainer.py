"""Training and evaluating compiled artifacts with onnxruntime-training's on-device API."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoints
from .checkpoints import sha256_file
from .data import Dataset, batches, eval_batches
from .errors import RunError
from .manifest import (  # noqa: F401  (DEFAULT_MODELS: re-exported for runtime.bundle)
    CLASSIFICATION_LOSSES,
    DEFAULT_MODELS,
    INITIAL_CHECKPOINT,
    MANIFEST,
    Manifest,
    SessionOptionsSpec,
    read_manifest,
)
from .ort_training import training_api

# Checkpoint properties the runtime writes: which artifacts the weights belong to, in what format,
# and which optimizer's state they carry (AdamW moments, or SGD whose momentum lives beside it).
ARTIFACTS_PROPERTY = "gfcompile_artifacts"
CHECKPOINT_FORMAT_PROPERTY = "gfcompile_checkpoint_format"
OPTIMIZER_PROPERTY = "gfcompile_optimizer"
# The step the current run started at (runtime/training_run.py), so a resumed run ends where it would have.
RUN_START_PROPERTY = "gfcompile_run_start"
CHECKPOINT_FORMAT = 1
# With skip_nonfinite, this many non-finite steps in a row means the run has diverged, not a bad sample.
MAX_CONSECUTIVE_SKIPS = 10


def model_files(manifest: dict | Manifest) -> dict[str, str]:
    """Which files hold the training, eval and optimizer models ("*.ort" in an ORT-format bundle)."""
    return (manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)).model_files()


def verified_manifest(artifacts: Path, verify: bool = True) -> Manifest:
    """The checked manifest; with `verify`, refuse artifacts whose files do not match their hashes."""
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    if verify:
        # The compiled checkpoint is verified too: training always writes to another file (see Trainer.save).
        for name, expected in manifest.files.items():
            file = artifacts / name
            if not file.is_file():
                raise RunError(f"{artifacts}: {name} is missing")
            if sha256_file(file) != expected:
                raise RunError(f"{artifacts}: {name} does not match its sha256 in the manifest (corrupted?)")
    return manifest


def load_manifest(artifacts: Path, verify: bool = True) -> dict:
    """`verified_manifest` as JSON, for the readers that take the manifest's JSON form (data loading)."""
    return verified_manifest(artifacts, verify).to_json()


def ort_quiet() -> None:
    """ORT warns about graph transformers it could not apply; that is noise on a device log."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def session_options(spec: SessionOptionsSpec):
    """The ORT session options the compiler asked for (execution order matters for row tiling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec.graph_optimization_level)
    options.execution_order = getattr(ort.ExecutionOrder, spec.execution_order)
    options.enable_cpu_mem_arena = spec.enable_cpu_mem_arena
    # Row-tiled artifacts turn these off: ORT otherwise keeps freed band buffers for reuse.
    options.enable_mem_pattern = spec.enable_mem_pattern
    options.enable_mem_reuse = spec.enable_mem_reuse
    options.log_severity_level = 3
    return options


def artifacts_identity(manifest: Manifest) -> str:
    """What a checkpoint must have been trained from: the source model, the plan and the I/O signature.

    Independent of the model file format, so an .onnx-trained checkpoint also resumes in an ORT-format bundle.
    """
    data = manifest.to_json()
    keys = [data.get(key) for key in ("source", "plan", "inputs", "outputs", "labels")]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


@dataclass
class EvalResult:
    loss: float
    accuracy: float | None
    samples: int


class Trainer:
    """One compiled model, its checkpoint state and its optimizer."""

    def __new__(cls, *args, **kwargs):
        # The backend is chosen by what is installed: without onnxruntime-training, the portable one.
        from .portable import PortableTrainer, training_build_installed

        if cls is Trainer and not training_build_installed():
            cls = PortableTrainer
        return super().__new__(cls)

    def __init__(self, artifacts: Path, checkpoint: Path | None = None, lr: float | None = None):
        ort_quiet()
        self.artifacts = Path(artifacts)
        self.spec = verified_manifest(self.artifacts)
        # The JSON form, for readers that take it (runtime.data.load_data and the benchmarks).
        self.manifest = self.spec.to_json()
        api = training_api()
        checkpoint = Path(checkpoint) if checkpoint is not None else self.artifacts / INITIAL_CHECKPOINT
        if not checkpoint.exists():
            raise RunError(f"{checkpoint}: no such checkpoint")
        if not checkpoint.is_file():
            raise RunError(f"{checkpoint}: not a checkpoint file")
        # The compiled checkpoint is covered by the manifest's sha256 (verified above); any other
        # must match its own record, before onnxruntime reads a byte of it.
        entry = None if self._is_initial(checkpoint) else checkpoints.verify(checkpoint)
        try:
            self.state = api.CheckpointState.load_checkpoint(str(checkpoint))
        except Exception as exc:
            raise RunError(f"{checkpoint}: cannot load checkpoint ({_last_line(exc)})") from None
        self.identity = artifacts_identity(self.spec)
        self._check_checkpoint(checkpoint)
        trains = {name for name, parameter in self.state.parameters if parameter.requires_grad}
        missing = [name for name in self.spec.plan.trainable_params if name not in trains]
        if missing:
            raise RunError(
                f"{self.artifacts / MANIFEST}: plan.trainable_params: {missing[0]!r} is not a trainable "
                f"parameter of {checkpoint}"
            )
        files = self.spec.model_files()
        try:
            self.module = api.Module(
                str(self.artifacts / files["training"]),
                self.state,
                str(self.artifacts / files["eval"]),
                device="cpu",
                session_options=session_options(self.spec.session_options),
            )
        except Exception as exc:
            raise RunError(f"{self.artifacts}: onnxruntime cannot load the models ({_last_line(exc)})") from None
        optimizer = self.spec.optimizer
        self.lr = float(lr if lr is not None else optimizer.lr)
        self.momentum = float(optimizer.momentum or 0.0) if optimizer.type == "sgd" else 0.0
        self.weight_decay = optimizer.weight_decay
        self.trainable = list(self.spec.plan.trainable_params)
        self._velocity: dict[str, np.ndarray] = {}
        if self.momentum > 0:
            # ORT 1.19's SGD optimizer op has no momentum, so the update runs here in numpy
            # over the (few) trainable tensors of the last layers.
            self.optimizer = None
            self._load_velocity(checkpoint, entry)
        else:
            try:
                self.optimizer = api.Optimizer(str(self.artifacts / files["optimizer"]), self.module)
            except Exception as exc:
                raise RunError(
                    f"{checkpoint}: onnxruntime cannot set up the {optimizer.type} optimizer from it ({_last_line(exc)})"
                ) from None
            self.optimizer.set_learning_rate(self.lr)
        self.batch_size = self.spec.batch_size
        self.skipped_steps: list[int] = []
        self.run_start: int | None = _property(self.state, RUN_START_PROPERTY)

    def _is_initial(self, checkpoint: Path) -> bool:
        return checkpoint.resolve() == (self.artifacts / INITIAL_CHECKPOINT).resolve()

    def _check_checkpoint(self, checkpoint: Path) -> None:
        """Refuse a checkpoint written for other artifacts, optimizer or format, before ORT reads its weights."""
        fmt = _property(self.state, CHECKPOINT_FORMAT_PROPERTY)
        if fmt is not None and fmt != CHECKPOINT_FORMAT:
            raise RunError(
                f"{checkpoint}: checkpoint format {fmt} is not {CHECKPOINT_FORMAT}; it needs another runtime"
            )
        owner = _property(self.state, ARTIFACTS_PROPERTY)
        if owner is not None and owner != self.identity:
            raise RunError(
                f"{checkpoint}: this checkpoint was trained from other artifacts (model, plan or input shape "
                f"differ from {self.artifacts}); start from {self.artifacts / INITIAL_CHECKPOINT} instead"
            )
        optimizer = _property(self.state, OPTIMIZER_PROPERTY)
        if optimizer is not None and optimizer != self.spec.optimizer.type:
            raise RunError(
                f"{checkpoint}: this checkpoint holds {optimizer} optimizer state but {self.artifacts} trains with "
                f"{self.spec.optimizer.type}; start from {self.artifacts / INITIAL_CHECKPOINT} or use the {optimizer} "
                "artifacts"
            )

    @property
    def step(self) -> int:
        return int(self.state.properties["step"]) if "step" in self.state.properties else 0

    # The trainable parameters as numpy arrays: the one view of the weights that code outside the
    # backends (the federated client, the server's evaluator) reads and writes, on either backend.
    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters, by name, in the manifest's order."""
        return {name: self.state.parameters[name].data.copy() for name in self.trainable}

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable parameters named in `values` (copied in); the optimizer state stays."""
        for name, value in values.items():
            shape = self.state.parameters[name].data.shape if name in self.trainable else None
            self.state.parameters[name] = parameter_value(name, value, shape, self.artifacts)

    def train_step(self, x: np.ndarray, y: np.ndarray, skip_nonfinite: bool = False) -> float:
        """One optimizer step; returns the loss.

        A non-finite loss or gradient never reaches the weights: it stops training with a RunError,
        or with `skip_nonfinite` the batch is dropped (the step counter still advances, so the data
        order stays a function of the step) and NaN is returned.
        """
        self.module.train()
        outputs = self._run_module(x, y)
        loss = float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))
        problem = None
        if not np.isfinite(loss):
            problem = f"the loss is {loss}"
        else:
            bad = next(
                (name for name in self.trainable if not np.isfinite(self.state.parameters[name].grad).all()), None
            )
            if bad is not None:
                problem = f"the gradient of {bad} is not finite (loss {loss:.4g})"
        if problem is not None:
            self.module.lazy_reset_grad()
            if not skip_nonfinite:
                raise RunError(
                    f"step {self.step + 1}: {problem}; stopping before the weights are updated "
                    "(--skip-nonfinite skips such batches instead)"
                )
            self.skipped_steps.append(self.step + 1)
            self.state.properties["step"] = self.step + 1
            return float("nan")
        if self.optimizer is not None:
            self.optimizer.step()
        else:
            self._momentum_step()
        self.module.lazy_reset_grad()
        self.state.properties["step"] = self.step + 1
        return loss

    def _momentum_step(self) -> None:
        params = self.state.parameters
        for name in self.trainable:
            parameter = params[name]
            grad = parameter.grad
            value = parameter.data
            if self.weight_decay:
                grad = grad + self.weight_decay * value
            velocity = self._velocity.get(name)
            velocity = grad.copy() if velocity is None else self.momentum * velocity + grad
            self._velocity[name] = velocity
            params[name] = (value - self.lr * velocity).astype(np.float32)

    def outputs(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Eval-mode loss and model output for one batch."""
        self.module.eval()
        outputs = self._run_module(x, y)
        return float(np.asarray(outputs[0])), np.asarray(outputs[1])

    def _run_module(self, x: np.ndarray, y: np.ndarray):
        try:
            # A tuple: the several inputs of a feature-cache tail (runtime/feature_cache.py).
            return self.module(*x, y) if isinstance(x, tuple) else self.module(x, y)
        except Exception as exc:  # onnxruntime's errors for inputs the graph does not take
            raise RunError(
                f"step {self.step + 1}: onnxruntime cannot run the model on this batch ({_one_line(exc)}); "
                f"do the shapes in {self.artifacts / MANIFEST} match the compiled models?"
            ) from None

    def evaluate(self, data: Dataset) -> EvalResult:
        total_loss, correct, count, label_count = 0.0, 0, 0, 0
        classify = self.spec.loss in CLASSIFICATION_LOSSES
        for x, y, real in eval_batches(data, self.batch_size):
            loss, logits = self.outputs(x, y)
            total_loss += loss * real
            count += real
            if classify:
                predicted = logits[:real].argmax(axis=1)
                labels = y[:real]
                mask = labels != self.spec.ignore_index if labels.ndim > 1 else np.ones_like(labels, bool)
                correct += int(((predicted == labels) & mask).sum())
                label_count += int(mask.sum())
        accuracy = correct / label_count if classify and label_count else None
        return EvalResult(loss=total_loss / count, accuracy=accuracy, samples=count)

    def fit(
        self,
        data: Dataset,
        steps: int,
        seed: int = 0,
        log_every: int = 10,
        checkpoint: Path | None = None,
        checkpoint_every: int = 0,
        out=sys.stderr,
        skip_nonfinite: bool = False,
    ) -> list[float]:
        """Train `steps` more steps; the data order depends only on (seed, step), so resuming repeats nothing.

        With `skip_nonfinite`, batches with a non-finite loss or gradient are skipped (their loss is NaN
        in the returned list); MAX_CONSECUTIVE_SKIPS of them in a row stop training with a RunError.
        """
        stream = batches(data, self.batch_size, seed, start_step=self.step)
        losses: list[float] = []
        start = time.perf_counter()
        target = self.step + steps
        consecutive = 0
        while self.step < target:
            x, y = next(stream)
            loss = self.train_step(x, y, skip_nonfinite=skip_nonfinite)
            losses.append(loss)
            consecutive = consecutive + 1 if np.isnan(loss) else 0
            if np.isnan(loss):
                print(f"step {self.step:>6}/{target}  skipped: non-finite loss or gradient", file=out, flush=True)
            if consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise RunError(
                    f"steps {self.step - consecutive + 1}..{self.step}: {consecutive} batches in a row had a "
                    "non-finite loss or gradient; the run has diverged (lower the learning rate)"
                )
            done = len(losses)
            if log_every and (done % log_every == 0 or self.step == target):
                elapsed = time.perf_counter() - start
                rate = done * self.batch_size / elapsed if elapsed else 0.0
                recent = [value for value in losses[-log_every:] if np.isfinite(value)]
                shown = f"{float(np.mean(recent)):.4f}" if recent else "n/a"
                print(
                    f"step {self.step:>6}/{target}  loss {shown}  {rate:,.{0 if rate >= 10 else 2}f} samples/s",
                    file=out,
                    flush=True,
                )
            if checkpoint is not None and checkpoint_every and self.step % checkpoint_every == 0:
                self.save(checkpoint)
        return losses

    def protected_files(self) -> set[Path]:
        """Files a checkpoint must never be written over: the manifest and every file it lists."""
        return {(self.artifacts / name).resolve() for name in [MANIFEST, *self.spec.files]}

    def check_save_path(self, checkpoint: Path) -> None:
        """Refuse a checkpoint path that cannot be written, or would overwrite the artifacts, before any step."""
        checkpoint = Path(checkpoint)
        if checkpoint.resolve() == (self.artifacts / INITIAL_CHECKPOINT).resolve():
            raise RunError(
                f"{checkpoint}: is the compiled initial checkpoint, which the manifest's sha256 protects; "
                "save the trained weights to another path"
            )
        written = [checkpoint, checkpoints.record_path(checkpoint)]
        clash = next((path for path in written if path.resolve() in self.protected_files()), None)
        if clash is not None:
            raise RunError(
                f"{checkpoint}: would overwrite {clash.name} of the artifacts in {self.artifacts}; "
                "save the trained weights to another path"
            )
        check_writable_file(checkpoint, "checkpoint", create_folders=True)

    def save(self, checkpoint: Path) -> None:
        """Write the checkpoint atomically, with its integrity record: a crash leaves the previous one intact.

        Momentum buffers (numpy SGD) go to a file named by step, written BEFORE the
        checkpoint, so whichever checkpoint survives a crash finds the velocity of its own step;
        the record holds the sha256 of both (runtime/checkpoints.py).
        """
        api = training_api()
        checkpoint = Path(checkpoint)
        self.check_save_path(checkpoint)
        # The last good checkpoint is never replaced by one holding NaN/Inf weights.
        bad = [name for name in self.trainable if not np.isfinite(self.state.parameters[name].data).all()]
        if bad:
            raise RunError(f"{checkpoint}: not saved, {bad[0]} holds NaN or Inf; the previous checkpoint is kept")
        self.state.properties[ARTIFACTS_PROPERTY] = self.identity
        self.state.properties[CHECKPOINT_FORMAT_PROPERTY] = CHECKPOINT_FORMAT
        self.state.properties[OPTIMIZER_PROPERTY] = self.spec.optimizer.type
        if self.run_start is not None:
            self.state.properties[RUN_START_PROPERTY] = self.run_start
        temporaries = []
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            velocity_name = velocity_digest = None
            if self._velocity:
                velocity_path = checkpoints.momentum_path(checkpoint, self.step)
                temporary = velocity_path.with_name(velocity_path.name + ".tmp.npz")
                temporaries.append(temporary)
                np.savez(temporary, **self._velocity)
                _fsync(temporary)
                os.replace(temporary, velocity_path)
                velocity_name, velocity_digest = velocity_path.name, sha256_file(velocity_path)
            temporary = checkpoint.with_name(checkpoint.name + ".tmp")
            temporaries.append(temporary)
            api.CheckpointState.save_checkpoint(self.state, str(temporary), include_optimizer_state=True)
            _fsync(temporary)
            entry = checkpoints.CheckpointEntry(sha256_file(temporary), self.step, velocity_name, velocity_digest)
            checkpoints.replace(checkpoint, temporary, entry)
        except OSError as exc:
            raise RunError(
                f"{checkpoint}: cannot write the checkpoint ({exc.strerror or exc}); the previous one is kept"
            ) from None
        except RuntimeError as exc:  # ORT's checkpoint writer reports a failed write (full disk) as a RuntimeError
            reason = re.search(r"error:\s*(.*?)\s*errno:", str(exc))
            raise RunError(
                f"{checkpoint}: cannot write the checkpoint ({reason.group(1) if reason else _last_line(exc)}); "
                "the previous one is kept"
            ) from None
        finally:
            # Interrupted (Ctrl-C) between write and rename: the previous checkpoint stays, no stray temp file.
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
        for stale in checkpoint.parent.glob(f"{checkpoint.name}.momentum-*.npz"):
            if stale.name != checkpoints.momentum_path(checkpoint, self.step).name:
                stale.unlink(missing_ok=True)

    def _load_velocity(self, checkpoint: Path, entry: checkpoints.CheckpointEntry | None) -> None:
        path = checkpoints.verify_momentum(checkpoint, entry) if entry is not None else None
        if path is not None:
            try:
                with np.load(path, allow_pickle=False) as archive:
                    self._velocity = {name: archive[name] for name in archive.files}
            except (OSError, ValueError) as exc:
                raise RunError(f"{path}: cannot read the momentum buffers ({_last_line(exc)})") from None
            unknown = sorted(set(self._velocity) - set(self.trainable))
            if unknown:
                raise RunError(f"{path}: momentum for {unknown[0]}, which these artifacts do not train")
        elif self.step > 0:
            raise RunError(f"{checkpoint}: no momentum buffers saved for step {self.step}; cannot resume SGD exactly")

    def export_inference(self, path: Path) -> Path:
        """An inference-only ONNX model with the current weights, runnable by plain onnxruntime."""
        output_names = [value.name for value in self.spec.outputs]
        try:
            self.module.export_model_for_inferencing(str(path), output_names)
        except Exception as exc:  # onnxruntime reports a full disk or an unwritable path as a RuntimeError
            raise RunError(f"{path}: cannot write the inference model ({_last_line(exc)})") from None
        return Path(path)


def parameter_value(name: str, value: np.ndarray, shape: tuple[int, ...] | None, artifacts: Path) -> np.ndarray:
    """`value` as a contiguous float32 copy for trainable parameter `name` of shape `shape` (None: not
    a trainable parameter of `artifacts`); RunError on a name or shape mismatch (both backends)."""
    if shape is None:
        raise RunError(f"{artifacts}: {name!r} is not a trainable parameter of these artifacts")
    value = np.asarray(value)
    if value.shape != tuple(shape):
        raise RunError(f"{artifacts}: parameter {name} has shape {list(shape)}, not {list(value.shape)}")
    return np.array(value, dtype=np.float32, order="C")


def check_writable_file(path: Path, what: str, create_folders: bool = False) -> None:
    """Refuse, before any work, a file path that cannot be written: a folder, under a file, read-only.

    With `create_folders`, missing parent folders are fine (the writer creates them).
    """
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: is a directory; give a file name for the {what}")
    folder = path.parent
    while not folder.exists() and create_folders and folder != folder.parent:
        folder = folder.parent
    if not folder.exists():
        raise RunError(f"{path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise RunError(f"{path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"{path}: cannot write in {folder} (permission denied)")


def _property(state, name: str):
    # ORT's PropertyBag has `in` and [] but no .get().
    return state.properties[name] if name in state.properties else None  # noqa: SIM401


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """All of an exception's message on one line (onnxruntime puts the useful part mid-message)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    text = text.split("[ONNXRuntimeError] : ")[-1]  # drop the C++ source location before it
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
