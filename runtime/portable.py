"""Training on plain onnxruntime: the portable backend (onnxruntime + numpy, no training wheel).

`Trainer(...)` gives a `PortableTrainer` where onnxruntime-training is not installed (see
`Trainer.__new__`); the CLI, `gftrain` and the Trainer API are the same for both backends.

The compiler's `train_step.onnx` is a pure function (gfcompile/train_step.py): parameters and
optimizer state go in, updated ones come out. They stay onnxruntime OrtValues for the whole run:
each step binds the current set as inputs and a second, preallocated set as outputs (IO binding),
then swaps the two, so the weights never pass through numpy in the training loop. A step whose
loss or gradient is not finite is not swapped in, so the weights never take NaN values.

Checkpoints are safetensors files (runtime/safetensors_io.py): the trainable parameters and the
optimizer state under their train-step input names, and the metadata `step`, `gfcompile_artifacts`
(which artifacts they belong to), `gfcompile_optimizer` and `gfcompile_checkpoint_format`. They
are written to a temporary file and renamed, with the same integrity record as the training
build's checkpoints (runtime/checkpoints.py). The inference export patches the trained weights
into the compiler's inference template at the byte ranges the manifest records.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from . import checkpoints
from .checkpoints import sha256_file
from .errors import RunError
from .manifest import PortableSpec
from .safetensors_io import read_safetensors, write_safetensors
from .trainer import (
    ARTIFACTS_PROPERTY,
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_PROPERTY,
    OPTIMIZER_PROPERTY,
    RUN_START_PROPERTY,
    Trainer,
    _last_line,
    artifacts_identity,
    ort_quiet,
    parameter_value,
    session_options,
    verified_manifest,
)

STEP_PROPERTY = "step"


def training_build_installed() -> bool:
    """Whether onnxruntime-training (which the default backend needs) is importable here.

    With no onnxruntime at all, neither backend can run: say so in one line, not an ImportError.
    """
    try:
        if importlib.util.find_spec("onnxruntime") is None:
            raise RunError(
                "no onnxruntime is installed: `pip install onnxruntime` (the portable train step, any "
                "platform) or `pip install onnxruntime-training-cpu==1.19.2` (x86_64, Python <= 3.12)"
            )
        return importlib.util.find_spec("onnxruntime.training") is not None
    except (ImportError, ValueError):
        return False


class PortableTrainer(Trainer):
    """The Trainer API on plain onnxruntime (see the module docstring)."""

    def __init__(self, artifacts: Path, checkpoint: Path | None = None, lr: float | None = None):
        import onnxruntime as ort

        ort_quiet()
        self.artifacts = Path(artifacts)
        self.spec = verified_manifest(self.artifacts)
        self.manifest = self.spec.to_json()
        if self.spec.portable is None:
            raise RunError(
                f"{self.artifacts}: these artifacts have no portable train step (an older gfcompile, or an op "
                "without a lowering, which the compile named); install onnxruntime-training-cpu==1.19.2 to train them"
            )
        self.portable: PortableSpec = self.spec.portable
        self.identity = artifacts_identity(self.spec)
        self.initial_checkpoint = self.artifacts / self.portable.checkpoint
        checkpoint = Path(checkpoint) if checkpoint is not None else self.initial_checkpoint
        if not checkpoint.exists():
            raise RunError(f"{checkpoint}: no such checkpoint")
        if not checkpoint.is_file():
            raise RunError(f"{checkpoint}: not a checkpoint file")
        if checkpoint.resolve() != self.initial_checkpoint.resolve():
            checkpoints.verify(checkpoint)
        tensors, metadata = read_safetensors(checkpoint)
        self._check_metadata(checkpoint, metadata)
        self._step = int(metadata.get(STEP_PROPERTY, "0"))
        start = metadata.get(RUN_START_PROPERTY)
        self.run_start: int | None = int(start) if start is not None else None

        self._options = session_options(self.spec.session_options)
        try:
            self.session = ort.InferenceSession(
                str(self.artifacts / self.portable.train_step), self._options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RunError(f"{self.artifacts}: onnxruntime cannot load the train step ({_last_line(exc)})") from None
        self._eval_session = None
        optimizer_state = [s for group in self.portable.groups for s in group.state]
        self._state_names = [p.input for p in self.portable.parameters] + [s.input for s in optimizer_state]
        self._output_of = {p.input: p.output for p in self.portable.parameters}
        self._output_of.update({s.input: s.output for s in optimizer_state})
        expected = {i.name: i.shape for i in self.session.get_inputs()}
        parameter_inputs = {p.input for p in self.portable.parameters}
        self._current = {}
        for name in self._state_names:
            value = tensors.get(name)
            if value is None and self._step == 0 and name not in parameter_inputs:
                value = tensors[name] = np.zeros(expected[name], np.float32)  # optimizer state starts at zero
            if value is None:
                raise RunError(f"{checkpoint}: holds no {name}, which these artifacts train")
            if list(value.shape) != list(expected[name]) or value.dtype != np.float32:
                raise RunError(f"{checkpoint}: {name} has shape {list(value.shape)}, the model needs {expected[name]}")
            self._current[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
        # The second buffer set, written by each step and swapped in when the step is finite.
        self._spare = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(list(expected[name]), np.float32)
            for name in self._state_names
        }

        optimizer = self.spec.optimizer
        self.lr = float(lr if lr is not None else optimizer.lr)
        self.momentum = float(optimizer.momentum or 0.0) if optimizer.type == "sgd" else 0.0
        self.weight_decay = optimizer.weight_decay
        self.trainable = [p.name for p in self.portable.parameters]
        self.batch_size = self.spec.batch_size
        self.skipped_steps: list[int] = []

    def _check_metadata(self, checkpoint: Path, metadata: dict[str, str]) -> None:
        fmt = metadata.get(CHECKPOINT_FORMAT_PROPERTY)
        if fmt is not None and fmt != str(CHECKPOINT_FORMAT):
            raise RunError(
                f"{checkpoint}: checkpoint format {fmt} is not {CHECKPOINT_FORMAT}; it needs another runtime"
            )
        owner = metadata.get(ARTIFACTS_PROPERTY)
        if owner is not None and owner != self.identity:
            raise RunError(
                f"{checkpoint}: this checkpoint was trained from other artifacts (model, plan or input shape "
                f"differ from {self.artifacts}); start from the artifacts' initial checkpoint instead"
            )
        optimizer = metadata.get(OPTIMIZER_PROPERTY)
        if optimizer is not None and optimizer != self.spec.optimizer.type:
            raise RunError(
                f"{checkpoint}: this checkpoint holds {optimizer} optimizer state but {self.artifacts} trains with "
                f"{self.spec.optimizer.type}"
            )

    @property
    def step(self) -> int:
        return self._step

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the current trainable parameters, by name."""
        return {p.name: np.array(self._current[p.input].numpy()) for p in self.portable.parameters}

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable parameters named in `values` (copied into the current buffers)."""
        inputs = {p.name: p.input for p in self.portable.parameters}
        for name, value in values.items():
            buffer = self._current[inputs[name]] if name in inputs else None
            shape = None if buffer is None else tuple(buffer.shape())
            checked = parameter_value(name, value, shape, self.artifacts)  # refuses a name not trained here
            buffer.update_inplace(checked)

    def train_step(self, x: np.ndarray, y: np.ndarray, skip_nonfinite: bool = False) -> float:
        """One optimizer step; returns the loss (see Trainer.train_step for the non-finite rules)."""
        binding = self.session.io_binding()
        self._bind_batch(binding, x, y)
        binding.bind_cpu_input(self.portable.step_input, np.array(self._step, dtype=np.int64))
        binding.bind_cpu_input(self.portable.lr_input, np.array(self.lr, dtype=np.float32))
        binding.bind_output(self.portable.loss_output)  # outputs come back in binding order
        binding.bind_output(self.portable.gradient_norm_output)
        for name in self._state_names:
            binding.bind_ortvalue_input(name, self._current[name])
            binding.bind_ortvalue_output(self._output_of[name], self._spare[name])
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise RunError(f"step {self._step + 1}: onnxruntime failed ({_last_line(exc)})") from None
        loss_value, norm_value = binding.get_outputs()[:2]
        loss = float(loss_value.numpy())
        gradient_norm = float(norm_value.numpy())
        problem = None
        if not np.isfinite(loss):
            problem = f"the loss is {loss}"
        elif not np.isfinite(gradient_norm):
            problem = f"a gradient is not finite (loss {loss:.4g})"
        if problem is not None:
            if not skip_nonfinite:
                raise RunError(
                    f"step {self._step + 1}: {problem}; stopping before the weights are updated "
                    "(--skip-nonfinite skips such batches instead)"
                )
            self.skipped_steps.append(self._step + 1)
            self._step += 1
            return float("nan")
        self._current, self._spare = self._spare, self._current
        self._step += 1
        return loss

    def _bind_batch(self, binding, x: np.ndarray, y: np.ndarray) -> None:
        # A tuple: the several inputs of a feature-cache tail (runtime/feature_cache.py).
        for name, value in zip(self.portable.data_inputs, x if isinstance(x, tuple) else (x,), strict=False):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_cpu_input(self.portable.label_input, np.ascontiguousarray(y))

    def outputs(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Eval-mode loss and model output for one batch."""
        import onnxruntime as ort

        if self._eval_session is None:  # created on first use: a training run never holds its weights twice
            self._eval_session = ort.InferenceSession(
                str(self.artifacts / self.portable.eval_step), self._options, providers=["CPUExecutionProvider"]
            )
        binding = self._eval_session.io_binding()
        self._bind_batch(binding, x, y)
        wanted = {i.name for i in self._eval_session.get_inputs()}
        for p in self.portable.parameters:
            if p.input in wanted:
                binding.bind_ortvalue_input(p.input, self._current[p.input])
        binding.bind_output(self.portable.loss_output)
        binding.bind_output(self.portable.model_outputs[0])
        self._eval_session.run_with_iobinding(binding)
        loss, logits = binding.copy_outputs_to_cpu()
        return float(loss), np.asarray(logits)

    def check_save_path(self, checkpoint: Path) -> None:
        if Path(checkpoint).resolve() == self.initial_checkpoint.resolve():
            raise RunError(
                f"{checkpoint}: is the compiled initial checkpoint, which the manifest's sha256 protects; "
                "save the trained weights to another path"
            )
        super().check_save_path(checkpoint)

    def save(self, checkpoint: Path) -> None:
        """Write the checkpoint atomically with its integrity record; never one holding NaN/Inf weights."""
        checkpoint = Path(checkpoint)
        self.check_save_path(checkpoint)
        arrays = {name: np.array(self._current[name].numpy()) for name in self._state_names}
        bad = next((name for name in self.trainable if not np.isfinite(arrays[name]).all()), None)
        if bad is not None:
            raise RunError(f"{checkpoint}: not saved, {bad} holds NaN or Inf; the previous checkpoint is kept")
        metadata = {
            STEP_PROPERTY: str(self._step),
            ARTIFACTS_PROPERTY: self.identity,
            OPTIMIZER_PROPERTY: self.spec.optimizer.type,
            CHECKPOINT_FORMAT_PROPERTY: str(CHECKPOINT_FORMAT),
        }
        if self.run_start is not None:
            metadata[RUN_START_PROPERTY] = str(self.run_start)
        temporary = checkpoint.with_name(checkpoint.name + ".tmp")
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(temporary, arrays, metadata)
            entry = checkpoints.CheckpointEntry(sha256_file(temporary), self._step, None, None)
            checkpoints.replace(checkpoint, temporary, entry)
        except OSError as exc:
            raise RunError(
                f"{checkpoint}: cannot write the checkpoint ({exc.strerror or exc}); the previous one is kept"
            ) from None
        finally:
            temporary.unlink(missing_ok=True)

    def export_inference(self, path: Path) -> Path:
        """The inference model with the current weights: the compiler's template, trained bytes patched in."""
        return write_inference_model(self.artifacts, self.portable, self.parameters(), path)


def write_inference_model(
    artifacts: Path, portable: PortableSpec, parameters: dict[str, np.ndarray], path: Path
) -> Path:
    """`artifacts`' inference template with `parameters` (by name) patched in at the manifest's byte ranges."""
    template = bytearray((artifacts / portable.inference_template).read_bytes())
    for name, (offset, length) in portable.inference_patches.items():
        data = np.ascontiguousarray(parameters[name]).astype("<f4", copy=False).tobytes()
        if len(data) != length:
            raise RunError(f"{artifacts}: the inference template's {name} has {length} bytes, not {len(data)}")
        template[offset : offset + length] = data
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(template)
        handle.flush()
        os.fsync(handle.fileno())
    return path
