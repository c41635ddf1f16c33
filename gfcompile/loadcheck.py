"""Opening the compiled models in onnxruntime before they are published.

ORT's gradient builder writes models that its own sessions may refuse: a gradient op without a CPU
kernel (ResizeGrad), say, only shows up when the training session is created, which would be on the
device. `check_loadable` creates the sessions the runtime creates (checkpoint, training and eval
models in one training Module, the optimizer) with the session options the manifest asks for, so
artifacts that cannot load are never written.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from passes.base import Plan

from .backward import native_output_captured, run_isolated
from .errors import GfError
from .ort_errors import explain_ort_failure
from .output import MODEL_FILES

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
