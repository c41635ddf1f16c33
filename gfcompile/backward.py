"""Building the training, eval and optimizer models with ORT's gradient builder."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from passes.base import Plan
from runtime.ort_training import training_submodule
from runtime.signals import STOP_SIGNALS

from .config import CompileConfig
from .errors import GfError
from .ort_errors import explain_ort_failure
from .planning import PARAMETER_INPUTS

# ORT ops whose gradient onnxruntime-training 1.19 cannot build or that our passes cannot see through.
UNTRAINABLE_OPS = {"LSTM", "GRU", "RNN", "Loop", "If", "Scan"}


@dataclass
class TrainingModels:
    directory: Path
    training: onnx.ModelProto
    eval: onnx.ModelProto
    optimizer: onnx.ModelProto
    loss: str
    label_name: str
    model_inputs: list[onnx.ValueInfoProto]
    model_outputs: list[onnx.ValueInfoProto]
    # Layer tensor shapes the compile measured that eval_model.onnx leaves symbolic (manifest "shapes").
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint"


def frozen_parameters(model: onnx.ModelProto, plan: Plan) -> list[str]:
    """Float initializers in parameter slots that do not train: kept in the checkpoint, never updated."""
    initializers = {init.name: init for init in model.graph.initializer}
    trainable = set(plan.trainable_params)
    frozen: list[str] = []
    for node in model.graph.node:
        slots = PARAMETER_INPUTS.get(node.op_type, ())
        if node.op_type == "BatchNormalization":
            slots = (1, 2, 3, 4)
        for slot in slots:
            name = node.input[slot] if slot < len(node.input) else ""
            init = initializers.get(name)
            is_float = init is not None and init.data_type == onnx.TensorProto.FLOAT
            if is_float and name not in trainable and name not in frozen:
                frozen.append(name)
    return frozen


def resolve_loss(model: onnx.ModelProto, config: CompileConfig) -> str:
    if config.loss != "auto":
        return config.loss
    output = model.graph.output[0]
    rank = len(output.type.tensor_type.shape.dim)
    if rank == 2:
        return "cross_entropy"
    if rank == 4:
        return "pixel_cross_entropy"
    raise GfError(f"cannot pick a loss for output {output.name!r} of rank {rank}; pass --loss mse")


def check_trainable_ops(model: onnx.ModelProto, plan: Plan) -> None:
    """Refuse ops in the trainable part (from the first trainable conv on) that have no gradient here."""
    nodes = list(model.graph.node)
    position = {node.name: index for index, node in enumerate(nodes)}
    first = position.get(plan.trainable_convs[0], 0)
    for index in range(first, len(nodes)):
        node = nodes[index]
        if node.op_type in UNTRAINABLE_OPS or node.domain not in ("", "ai.onnx"):
            # The convs after this node could still train without differentiating it.
            after = sum(1 for layer in plan.convs if position.get(layer.node, -1) > index)
            hint = (
                f"train only the {after} conv layer(s) after it: --train-layers {after} (and --filter-layers <= {after})"
                if after
                else "it comes after the last conv layer, so no conv can train through it"
            )
            raise GfError(
                f"node {node.name!r} ({node.domain + '::' if node.domain else ''}{node.op_type}) is in the "
                f"trainable part and has no gradient here; {hint}"
            )


def build_backward(model: onnx.ModelProto, plan: Plan, config: CompileConfig, directory: Path) -> TrainingModels:
    """Run ORT's gradient builder into `directory` and load what it wrote."""
    artifacts = training_submodule("artifacts")
    onnxblock = training_submodule("onnxblock")
    check_trainable_ops(model, plan)
    missing = [name for name in plan.trainable_params if name not in {i.name for i in model.graph.initializer}]
    if missing:
        raise GfError(f"internal: trainable parameters vanished during forward passes: {missing[:5]}")
    plan.frozen_params = frozen_parameters(model, plan)

    loss_name = resolve_loss(model, config)
    model, loss_block, label_name = _loss_block(model, loss_name, config, onnxblock, artifacts)
    if config.optimizer == "adamw":
        optimizer = onnxblock.optim.AdamW(weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        optimizer = artifacts.OptimType.SGD
    else:
        raise GfError(f"unknown optimizer {config.optimizer!r}; choose adamw or sgd")

    directory.mkdir(parents=True, exist_ok=True)

    def generate() -> None:
        artifacts.generate_artifacts(
            model,
            requires_grad=plan.trainable_params,
            frozen_params=plan.frozen_params,
            loss=loss_block,
            optimizer=optimizer,
            artifact_directory=str(directory),
            # The runtime reports accuracy, so the training and eval models also return the logits.
            additional_output_names=[output.name for output in model.graph.output],
        )

    with native_output_captured() as captured:
        failure = run_isolated(generate)
    if failure is not None and "no space left on device" in failure.lower():
        # The child wrote the models and checkpoint into the staging folder; a full disk is not a graph problem.
        raise GfError(f"{directory.parent}: no space left on device while writing the training models; free some space")
    if failure is not None:
        explained = explain_ort_failure(failure, model, plan)
        raise GfError(f"ORT's gradient builder failed: {explained}{_control_flow_hint(model, failure)}")
    if captured.get("text") and "error" in captured["text"].lower():
        logging.getLogger(__name__).debug(captured["text"])
    optimizer_model = onnx.load(str(directory / "optimizer_model.onnx"))
    if config.optimizer == "adamw":
        _use_torch_adamw_semantics(optimizer_model)
        onnx.save(optimizer_model, str(directory / "optimizer_model.onnx"))
    return TrainingModels(
        directory=directory,
        training=onnx.load(str(directory / "training_model.onnx")),
        eval=onnx.load(str(directory / "eval_model.onnx")),
        optimizer=optimizer_model,
        loss=loss_name,
        label_name=label_name,
        model_inputs=[v for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}],
        model_outputs=list(model.graph.output),
    )


def run_isolated(work: Callable[[], None]) -> str | None:
    """Run `work` in a forked child; returns None on success, else a one-line failure.

    ORT's C++ gradient builder aborts the whole process (failed assertions) on some graphs, e.g. an If
    whose condition is computed, even in the frozen part; in a child that becomes a clear error. Where
    fork does not exist (Windows) the work runs in this process and such a graph still aborts it.
    """
    if not hasattr(os, "fork") or not hasattr(signal, "pthread_sigmask"):
        try:
            work()
        except Exception as exc:
            return _last_line(exc)
        return None
    read_end, write_end = os.pipe()
    # Stop signals (Ctrl-C, SIGTERM, SIGHUP) stay blocked across fork: one landing mid-fork would otherwise
    # be handled in the child's copy of the interpreter and lost in the parent. Blocking also runs any handler already due.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid == 0:  # the child: report through the pipe and leave without running any parent cleanup
        code = 0
        try:
            for signum in STOP_SIGNALS:  # the parent handles stop signals and kills the child
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(read_end)
            work()
        except BaseException as exc:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(write_end, _last_line(exc).encode(errors="replace")[:2000])
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a Ctrl-C that arrived meanwhile raises here
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:  # a stop signal: stop the child too, so no process keeps writing into the staging dir
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if os.WIFSIGNALED(status):
        return f"it crashed with signal {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WEXITSTATUS(status) != 0:
        return message or f"it exited with status {os.WEXITSTATUS(status)}"
    return None


def _control_flow_hint(model: onnx.ModelProto, failure: str) -> str:
    control = [node for node in model.graph.node if node.op_type in UNTRAINABLE_OPS]
    if not control or "crashed" not in failure:
        return ""
    node = control[0]
    return (
        f" (the model has {node.op_type} node {node.name!r}; onnxruntime-training 1.19 cannot build a training "
        "graph around it, even in the frozen part: export the model without it, e.g. with a constant condition)"
    )


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _use_torch_adamw_semantics(optimizer_model: onnx.ModelProto) -> None:
    """onnxblock builds ORT's AdamW in mode 1 (Hugging Face: eps outside the bias correction, decay after
    the update); mode 0 is PyTorch's AdamW, which is what users compare against."""
    for node in optimizer_model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attribute in node.attribute:
                if attribute.name == "adam_mode":
                    attribute.i = 0


@contextlib.contextmanager
def native_output_captured():
    """Capture what ORT's C++ gradient builder prints (it logs every graph transformer at INFO)."""
    captured: dict[str, str] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured["text"] = sink.read().decode(errors="replace")


def _pixel_cross_entropy_block(onnxblock, label_shape: list[int], ignore_index: int):
    """Per-pixel cross-entropy over NCHW logits with (N, H, W) labels.

    ORT's CrossEntropyLoss block derives the label shape by dropping the LAST logits dim,
    which is wrong for NCHW, so this block declares the label input itself.
    """

    class PixelCrossEntropy(onnxblock.Block):
        def build(self, scores_name: str, *_extra_outputs: str) -> str:
            graph = self.base.graph
            graph.input.append(helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, label_shape))
            graph.node.append(
                helper.make_node(
                    "SoftmaxCrossEntropyLoss",
                    [scores_name, "labels"],
                    ["pixel_ce_loss", "pixel_ce_log_prob"],
                    reduction="mean",
                    ignore_index=ignore_index,
                    name="PixelCrossEntropy",
                )
            )
            return "pixel_ce_loss"

    return PixelCrossEntropy()


def _loss_block(model, loss_name, config, onnxblock, artifacts):
    output = model.graph.output[0]
    if loss_name == "cross_entropy":
        return model, artifacts.LossType.CrossEntropyLoss, "labels"
    if loss_name == "mse":
        return model, artifacts.LossType.MSELoss, "target"
    if loss_name == "pixel_cross_entropy":
        dims = [d.dim_value for d in output.type.tensor_type.shape.dim]
        return model, _pixel_cross_entropy_block(onnxblock, [dims[0], *dims[2:]], config.ignore_index), "labels"
    raise GfError(f"unknown loss {loss_name!r}; choose cross_entropy, pixel_cross_entropy or mse")
