"""The compile flow. This is the only place that knows which passes run, and in what order."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime

from passes import (
    activation_mask,
    bn_eval_affine,
    cleanup,
    concat_inputs,
    frozen_bn_fold,
    gradient_filter,
    gradient_filter_fusion,
    layernorm_outputs,
    legalize_activations,
    legalize_resize,
    lower_activations,
    lower_batchnorm,
    lower_conv_grad,
    lower_index_grad,
    lower_loss_grad,
    lower_pool_grad,
    lower_softmax_grad,
    lower_training_ops,
    row_recompute,
    row_tiling,
    save_early,
    untie_parameters,
)
from passes.base import Plan
from runtime.manifest import (
    FORMAT_VERSION,
    FeatureCacheSpec,
    LayersSpec,
    Manifest,
    OptimizerSpec,
    PassesSpec,
    PlanSpec,
    SessionOptionsSpec,
    SourceSpec,
    TensorSpec,
)
from runtime.trainer import sha256_file

from . import __version__, prefix_split, train_step
from .backward import TrainingModels, build_backward
from .config import DEFAULT_BATCH_SIZE, CompileConfig
from .errors import GfError
from .inspection import branch_notes, layer_shapes_to_record
from .loadcheck import check_loadable
from .loading import load_and_validate, pin_shapes
from .output import (
    check_output_dir,
    publish,
    save_model,
    staging_directory,
    write_manifest,
)
from .passrunner import pass_name, passes_before, run_passes
from .planning import reused_parameters, select_layers, untrained_initializers
from .summary import format_table, layer_costs, totals

# Each stage's passes, in order (see passes/base.py for the stages and the pass contract).
# untie_parameters first: the rewrites after it and the planner then see one tensor per layer input.
LEGALIZE_PASSES = (untie_parameters, legalize_activations, legalize_resize, layernorm_outputs, concat_inputs)
FORWARD_PASSES = (frozen_bn_fold, bn_eval_affine, cleanup, row_tiling)
TRAINING_PASSES = (gradient_filter, gradient_filter_fusion, activation_mask, row_recompute, save_early)
LOWER_PASSES = (
    lower_conv_grad,
    lower_pool_grad,
    lower_batchnorm,
    lower_activations,
    lower_loss_grad,
    lower_index_grad,
    lower_softmax_grad,
    lower_training_ops,
)

Reporter = Callable[[str], None]


def compile_model(model_path: Path, config: CompileConfig, report: Reporter = print) -> Path:
    """Compile `model_path` into a training artifacts folder at `config.output_dir`."""
    check_output_dir(config.output_dir, config.force)
    model = load_and_validate(model_path, downconvert=config.downconvert)
    report_reused_parameters(model, report)
    legalized: list[str] = []
    model = run_passes(LEGALIZE_PASSES, model, None, stage="legalize", history=legalized)
    report_batch_default(model, config, report)
    model = pin_shapes(model, config)
    plan = select_layers(model, config)
    plan.passes_run.extend(legalized)
    if config.memory_budget_mb is not None:
        plan.row_tiles = tiles_for_budget(model, plan, config.memory_budget_mb, report)
    report(describe_plan(plan))
    report_untrained(model, plan, report)
    for note in branch_notes(model, plan):  # "last N" in graph order can cut a parallel branch off
        report(f"note: {note}")
    costs = layer_costs(plan)
    report(format_table(costs))
    forward = run_passes(FORWARD_PASSES, model, plan, stage="forward")
    if plan.row_tiles >= 2 and not plan.tiled_chains:
        report(f"--row-tiles {plan.row_tiles}: no conv chain could be tiled (run with -v for why); compiled untiled")
    split = prefix_split.split_frozen_prefix(forward, plan) if config.feature_cache else None
    with staging_directory(config.output_dir) as staging:
        # The tail compiles from its own copy of the plan: the backward build and training passes fill it in.
        feature_cache = (
            compile_tail(split, copy.deepcopy(plan), config, model_path, costs, staging, report) if split else None
        )
        report("building the backward graph with onnxruntime-training ...")
        train = build_backward(forward, plan, config, staging)
        train.training = run_passes(TRAINING_PASSES, train.training, plan, stage="training")
        try:
            portable, not_lowerable = build_portable_step(train, plan, config), None
        except NotLowerable as exc:  # raised after the load check, whose message is more specific
            portable, not_lowerable = None, exc
        train.shapes = layer_shapes_to_record(train.eval, model, forward)
        write_artifacts(train, plan, config, model_path, costs, portable, feature_cache)
        report("opening the compiled models in onnxruntime ...")
        check_loadable(train.directory, row_tiling.required_session_options(plan), forward, plan)
        if not_lowerable is not None:
            raise not_lowerable
        publish(staging, config.output_dir, force=config.force)
    report(f"wrote {config.output_dir}")
    return config.output_dir


def build_portable_step(train: TrainingModels, plan: Plan, config: CompileConfig) -> train_step.PortableModels | None:
    """The portable train step (standard ONNX ops, for plain onnxruntime), or None with --no-portable.

    A training-graph op that no lower pass handles fails the compile in one line naming it and the
    way out (--no-portable: artifacts for onnxruntime-training only); never a silent fallback."""
    if not config.portable:
        return None
    try:
        lowered = run_passes(LOWER_PASSES, train_step.with_shapes(train.training), plan, stage="lower")
    except GfError as exc:
        if "internal error" in str(exc):  # a bug in a lower pass, not an op it refuses
            raise
        raise NotLowerable(f"{exc}; {_NO_PORTABLE_HINT}") from None
    node = train_step.first_nonstandard_op(lowered)
    if node is not None:
        raise NotLowerable(
            f"cannot lower {node.op_type} {node.name!r} to standard ONNX ops for the portable train step; "
            f"{_NO_PORTABLE_HINT}"
        )
    try:
        return train_step.build_portable(lowered, train, plan.trainable_params, config)
    except GfError as exc:
        if "internal error" in str(exc):
            raise
        raise NotLowerable(f"{exc}; {_NO_PORTABLE_HINT}") from None  # e.g. a contrib op in the eval step


_NO_PORTABLE_HINT = "compile with --no-portable to write artifacts for onnxruntime-training only"


class NotLowerable(GfError):
    """The training graph has an op that no lower pass handles. The compile reports it after the
    load check: an op that onnxruntime-training cannot run either (an LSTM's gradient) is better
    named by that check, with the --train-layers that avoids it."""


def write_artifacts(
    train: TrainingModels,
    plan: Plan,
    config: CompileConfig,
    source: Path,
    costs: list[dict],
    portable: train_step.PortableModels | None,
    feature_cache: FeatureCacheSpec | None = None,
) -> None:
    save_model(train.training, train.directory / "training_model.onnx")
    save_model(train.eval, train.directory / "eval_model.onnx")
    save_model(train.optimizer, train.directory / "optimizer_model.onnx")
    portable_spec = train_step.write_portable(portable, train.directory) if portable is not None else None
    manifest = build_manifest(train, plan, config, source, costs)
    lowered = tuple(pass_name(p) for p in LOWER_PASSES) if portable is not None else ()
    manifest = dataclasses.replace(
        manifest,
        passes=dataclasses.replace(manifest.passes, lower=lowered),
        portable=portable_spec,
        feature_cache=feature_cache,
    )
    write_manifest(train.directory, manifest.to_json())


def compile_tail(
    split: prefix_split.PrefixSplit,
    plan: Plan,
    config: CompileConfig,
    source: Path,
    costs: list[dict],
    staging: Path,
    report: Reporter,
) -> FeatureCacheSpec:
    """Write the frozen prefix and compile the tail like the whole graph, into a folder of its own.

    Written before the whole graph's manifest, which then covers the tail's files too.
    """
    report(f"feature cache: the frozen prefix ends at {', '.join(split.cut)}; compiling the tail ...")
    save_model(split.prefix, staging / prefix_split.PREFIX_MODEL)
    tail = build_backward(split.tail, plan, config, staging / prefix_split.TAIL_DIRECTORY)
    tail.training = run_passes(TRAINING_PASSES, tail.training, plan, stage="training")
    portable = build_portable_step(tail, plan, config)
    write_artifacts(tail, plan, config, source, costs, portable)
    return FeatureCacheSpec(
        prefix_model=prefix_split.PREFIX_MODEL,
        tail=prefix_split.TAIL_DIRECTORY,
        cut=tuple(_tensor_spec(value) for value in split.prefix.graph.output),
    )


def build_manifest(
    train: TrainingModels, plan: Plan, config: CompileConfig, source: Path, costs: list[dict]
) -> Manifest:
    """The typed manifest (runtime/manifest.py) of these artifacts; `write_manifest` adds the files' hashes."""
    metadata = {prop.key: prop.value for prop in train.eval.metadata_props}
    return Manifest(
        format_version=FORMAT_VERSION,
        gfcompile_version=__version__,
        source=SourceSpec(path=str(source), sha256=sha256_file(source)),
        config=config.to_json(),
        versions={"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        passes=PassesSpec(
            legalize=tuple(pass_name(p) for p in LEGALIZE_PASSES),
            forward=tuple(pass_name(p) for p in FORWARD_PASSES),
            training=tuple(pass_name(p) for p in TRAINING_PASSES),
        ),
        plan=PlanSpec(
            trainable_convs=tuple(plan.trainable_convs),
            filtered=dict(plan.filtered),
            trainable_params=tuple(plan.trainable_params),
            frozen_params=tuple(plan.frozen_params),
            bn_mode=plan.bn_mode,
            paper_stride_scaling=plan.paper_stride_scaling,
            row_tiles=plan.applied_row_tiles,
            row_strategy=plan.row_strategy,
            row_tile_trainable=plan.row_tile_trainable,
            fitted_patch_sizes=dict(plan.fitted_patch_sizes),
        ),
        inputs=tuple(_tensor_spec(v) for v in train.model_inputs if v.name != train.label_name),
        labels=tuple(_tensor_spec(v) for v in train.training.graph.input if v.name == train.label_name),
        outputs=tuple(_tensor_spec(v) for v in train.model_outputs),
        loss=train.loss,
        ignore_index=config.ignore_index if train.loss == "pixel_cross_entropy" else None,
        optimizer=OptimizerSpec(
            type=config.optimizer,
            lr=config.lr,
            momentum=config.momentum if config.optimizer == "sgd" else None,
            weight_decay=config.weight_decay,
        ),
        session_options=SessionOptionsSpec(**row_tiling.required_session_options(plan)),
        preprocess=_json_or_none(metadata.get("preprocessing")),
        metadata=metadata,
        layers=LayersSpec(rows=tuple(costs), totals=totals(costs)),
        shapes={name: tuple(dims) for name, dims in train.shapes.items()} or None,
    )


def tiles_for_budget(model: onnx.ModelProto, plan: Plan, budget_mb: float, report: Reporter) -> int:
    """The smallest --row-tiles whose estimated peak fits the budget, estimated on the untiled forward."""
    untiled = run_passes(passes_before(FORWARD_PASSES, row_tiling), model, plan, stage="forward")
    try:
        tiles = row_tiling.tiles_for_budget(untiled, plan, budget_mb)
    except ValueError as exc:
        raise GfError(f"--memory-budget: {exc}") from None
    report(f"--memory-budget {budget_mb} MiB: using --row-tiles {tiles}")
    return tiles


def describe_plan(plan: Plan) -> str:
    trainable = set(plan.trainable_convs)
    filtered = ", ".join(f"{name} (r={r})" for name, r in plan.filtered.items()) or "none"
    fitted = "".join(
        f"; {name}: output smaller than the patch size, "
        + ("exact backward (r=1)" if r == 1 else f"r={r}, the largest that fits")
        for name, r in plan.fitted_patch_sizes.items()
    )
    tiling = f"; row tiles: {plan.row_tiles} ({plan.row_strategy})" if plan.row_tiles >= 2 else ""
    return (
        f"{len(plan.convs)} conv layers; training the last {len(trainable)} "
        f"({len(plan.trainable_params)} parameter tensors); gradient-filtered: {filtered}{fitted}{tiling}"
    )


def report_reused_parameters(model: onnx.ModelProto, report: Reporter) -> None:
    """Say which parameters the source model applies more than once: untie_parameters splits them."""
    for name, readers in reused_parameters(model).items():
        report(
            f"note: parameter {name} is read by {len(readers)} layers ({', '.join(readers[:4])}); "
            "each trains its own copy, where PyTorch would train one shared tensor"
        )


def report_untrained(model: onnx.ModelProto, plan: Plan, report: Reporter) -> None:
    """Name the float initializers of the trained part that keep their values for no stated reason."""
    unexplained = untrained_initializers(model, plan)
    if unexplained:
        shown = ", ".join(unexplained[:6]) + (f", ... ({len(unexplained)} in all)" if len(unexplained) > 6 else "")
        report(
            f"note: {len(unexplained)} float initializer(s) in the trained part are not layer parameters "
            f"(not in a Conv/Gemm/MatMul/norm parameter input) and keep their values: {shown}"
        )


def report_batch_default(model: onnx.ModelProto, config: CompileConfig, report: Reporter) -> None:
    if config.batch_size is not None:
        return
    first = model.graph.input[0].type.tensor_type.shape.dim
    if first and not first[0].HasField("dim_value"):
        report(f"batch dim is dynamic; pinning it to {DEFAULT_BATCH_SIZE} (set --batch-size to change)")


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    return TensorSpec(
        name=value.name,
        shape=tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim),
        dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
    )


def _json_or_none(text: str | None):
    import json

    return json.loads(text) if text else None
