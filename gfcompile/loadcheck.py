"""Opening the compiled models in onnxruntime before they are published.

ORT's gradient builder writes models that its own sessions may refuse: a gradient op without a CPU
kernel (ResizeGrad), say, only shows up when the training session is created, which would be on the
device. `check_loadable` creates the sessions the runtime creates (checkpoint, training and eval
models in one training Module, the optimizer) with the session options the manifest asks for, so
artifacts that cannot load are never written.

The portable models (gfcompile/train_step.py: `train_step.onnx`, `eval_step.onnx`, the inference
template, and the same in a feature-cache tail) are for plain onnxruntime, so each must hold
standard ONNX ops only. That is checked on the graph itself: this process's onnxruntime is the
training build, whose sessions accept com.microsoft training ops that plain onnxruntime refuses.
Then each passes the ONNX checker with strict shape inference and opens in an InferenceSession.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from passes.base import Plan
from runtime.manifest import Manifest, read_manifest

from .backward import native_output_captured, run_isolated
from .errors import GfError
from .ort_errors import explain_ort_failure
from .output import MODEL_FILES
from .train_step import check_standard_ops

TRAINING_FILE, EVAL_FILE, OPTIMIZER_FILE = MODEL_FILES
CHECKPOINT_FILE = "checkpoint"


def check_loadable(directory: Path, options: dict, forward: onnx.ModelProto, plan: Plan) -> None:
    """Create every session the runtime will create from `directory`'s checkpoint and models, with the
    manifest's session `options`; raise GfError with an explanation if one fails.

    The sessions are created in a child process, so that an ORT abort becomes a message too.
    `forward` is the model the backward was built from (for naming nodes in the message).
    """

    def load() -> None:
        from runtime.manifest import SessionOptionsSpec
        from runtime.ort_training import training_api
        from runtime.trainer import ort_quiet, session_options

        ort_quiet()  # graph-transformer warnings at session creation say nothing about loadability
        api = training_api()
        state = api.CheckpointState.load_checkpoint(str(directory / CHECKPOINT_FILE))
        module = api.Module(
            str(directory / TRAINING_FILE),
            state,
            str(directory / EVAL_FILE),
            device="cpu",
            session_options=session_options(SessionOptionsSpec(**options)),
        )
        api.Optimizer(str(directory / OPTIMIZER_FILE), module)

    # ORT logs graph-transformer warnings from its own environment whatever the severity asked for.
    with native_output_captured():
        failure = run_isolated(load)
    if failure is not None:
        raise GfError(f"the compiled models do not load in onnxruntime: {explain_ort_failure(failure, forward, plan)}")
    check_portable_loadable(directory, forward, plan)


def portable_models(directory: Path) -> list[Path]:
    """The models that plain onnxruntime opens from `directory`: its portable step, eval and inference
    models, and those of its feature-cache tail, with the frozen prefix."""
    manifest = read_manifest(directory)
    models = _portable_files(directory, manifest)
    if manifest.feature_cache is not None:
        tail = directory / manifest.feature_cache.tail
        models += [directory / manifest.feature_cache.prefix_model, *_portable_files(tail, read_manifest(tail))]
    return models


def _portable_files(directory: Path, manifest: Manifest) -> list[Path]:
    portable = manifest.portable
    if portable is None:  # an op without a lowering: the compile said so, the artifacts need the training build
        return []
    return [directory / name for name in (portable.train_step, portable.eval_step, portable.inference_template)]


def check_portable_loadable(directory: Path, forward: onnx.ModelProto, plan: Plan) -> None:
    """Refuse, in one line naming the file, a portable model with a non-standard op, one the ONNX
    checker (full check: strict shape inference) rejects, or one onnxruntime cannot open."""
    models = portable_models(directory)
    if not models:
        return
    for path in models:
        name = path.relative_to(directory)
        try:
            check_standard_ops(onnx.load(str(path), load_external_data=False))
            onnx.checker.check_model(str(path), full_check=True)  # a path: external data is read beside it
        except GfError as exc:
            raise GfError(f"the portable model {name} is not standard ONNX: {exc}") from None
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise GfError(f"the portable model {name} fails the ONNX checker: {_one_line(exc)}") from None
        except Exception as exc:  # onnx.load's protobuf DecodeError and OSError: a truncated or unreadable file
            raise GfError(f"the portable model {name} cannot be read as ONNX: {_one_line(exc)}") from None

    def load() -> None:
        import onnxruntime as ort

        from runtime.trainer import ort_quiet, session_options

        ort_quiet()
        options = session_options(read_manifest(directory).session_options)  # as the portable runtime opens them
        for path in models:
            try:
                ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's load errors have no common type
                raise RuntimeError(f"{path.relative_to(directory)}\t{_one_line(exc)}") from None

    with native_output_captured():
        failure = run_isolated(load)
    if failure is not None:
        name, _, message = failure.partition("\t")
        if not message:  # the child died (ORT abort) before reporting which file
            name, message = "one of " + ", ".join(str(p.relative_to(directory)) for p in models), failure
        raise GfError(
            f"the portable model {name} does not load in onnxruntime: {explain_ort_failure(message, forward, plan)}"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
