"""The `gfcompile` command: compile (the default), train, eval, diff, inspect, bundle and federate."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from runtime.errors import RunError
from runtime.options import add_run_arguments, positive_float
from runtime.signals import exit_code, quiet_teardown, signal_name, stop_on_termination

from .config import DEFAULT_TRAIN_LAYERS, CompileConfig
from .errors import GfError

SUBCOMMANDS = ("compile", "train", "eval", "diff", "inspect", "bundle", "federate", "export")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,224,224, got {text!r}") from None


def compile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfcompile",
        description="Compile an ONNX CNN into onnxruntime-training artifacts for on-device fine-tuning.",
        epilog="Other commands: gfcompile train ARTIFACTS --data D.npz, gfcompile eval ARTIFACTS --data D.npz, "
        "gfcompile diff A B, gfcompile inspect ARTIFACTS_OR_MODEL, gfcompile bundle ARTIFACTS -o BUNDLE, "
        "gfcompile federate ARTIFACTS --train-data D.npz --test-data T.npz, "
        "gfcompile export MODEL -o MODEL.onnx (torchvision name, zoo name or FILE.py:FACTORY)",
    )
    parser.add_argument("model", type=Path, help="the .onnx model to compile")
    parser.add_argument("-o", "--output", type=Path, default=Path("artifacts"), help="artifacts folder to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the passes' log: what each pass rewrote and why it skipped a candidate",
    )
    parser.add_argument(
        "--downconvert",
        action="store_true",
        help="accept an IR version > 10 or opset 22 (newer than onnxruntime-training 1.19 takes) by lowering it; "
        "the full ONNX checker then verifies the lowered model",
    )
    parser.add_argument(
        "--no-portable",
        dest="portable",
        action="store_false",
        help="write no portable train step (plain onnxruntime); for a model with an op the lowering does not "
        "handle, the artifacts then train with onnxruntime-training only",
    )
    layers = parser.add_argument_group("which layers train")
    layers.add_argument("--filter-layers", type=int, default=0, help="gradient-filter the last N conv layers")
    layers.add_argument(
        "--train-layers",
        type=int,
        default=None,
        help=f"train the last M conv layers (M >= N; default N, or {DEFAULT_TRAIN_LAYERS} without filtering)",
    )
    layers.add_argument("--patch-size", type=int, default=2, help="gradient-filter patch size r (default 2)")
    layers.add_argument(
        "--patch-size-map",
        type=Path,
        default=None,
        help="JSON file mapping conv node or weight names to their own patch size",
    )
    layers.add_argument(
        "--paper-stride-scaling",
        action="store_true",
        help="omit the 1/(s_h*s_w) factor of strided filtered layers, as the paper's reference code does",
    )
    layers.add_argument(
        "--bn-mode",
        choices=("eval", "train", "frozen"),
        default="eval",
        help="BatchNorm of trainable layers: eval (frozen statistics, affine trains; default), "
        "train (batch statistics), frozen (nothing trains; its backward keeps no activations)",
    )
    tiling = parser.add_argument_group("row tiling (LR-CNN, exact)")
    tiling.add_argument("--row-tiles", type=int, default=0, help="split conv chains into K row bands (0: off)")
    tiling.add_argument("--row-strategy", choices=("overl", "2ps"), default="overl")
    tiling.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="MB",
        help="pick the smallest K whose estimated peak activation memory fits (MiB)",
    )
    tiling.add_argument(
        "--row-tile-trainable",
        action="store_true",
        help="tile trainable layers too; their backward recomputes each band",
    )
    tiling.add_argument(
        "--feature-cache",
        action="store_true",
        help="also write the frozen prefix as an inference model and the trained tail's models, so training "
        "with --cache-features runs the prefix once per sample",
    )
    shapes = parser.add_argument_group("static shapes")
    shapes.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32)")
    shapes.add_argument("--input-shape", type=_shape, default=None, help="input shape C,H,W (or N,C,H,W)")
    training = parser.add_argument_group("loss and optimizer")
    training.add_argument("--loss", choices=("auto", "cross_entropy", "pixel_cross_entropy", "mse"), default="auto")
    training.add_argument("--ignore-index", type=int, default=255, help="label ignored by pixel cross-entropy")
    training.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    training.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def run_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"gfcompile {command}")
    parser.add_argument("artifacts", type=Path, help="folder written by gfcompile")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz file with arrays x and y, or a folder with one subfolder of images per class",
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to start from")
    if command == "train":
        add_run_arguments(parser)
        parser.add_argument(
            "--lr", type=positive_float("--lr"), default=None, help="override the compiled learning rate"
        )
        parser.add_argument(
            "--eval-data", type=Path, default=None, help="evaluate on this .npz or image folder before and after"
        )
        parser.add_argument(
            "--save",
            type=Path,
            default=None,
            help="where to write the trained checkpoint, every --checkpoint-every steps and at the end "
            "(default ARTIFACTS/trained_checkpoint)",
        )
        rerun = parser.add_mutually_exclusive_group()
        rerun.add_argument(
            "--resume", action="store_true", help="continue the run whose checkpoint is at --save, if there is one"
        )
        rerun.add_argument(
            "--restart",
            action="store_true",
            help="train again from --checkpoint (or the compiled weights) and replace the checkpoint at --save",
        )
    return parser


def diff_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfcompile diff",
        description="Compare two compiled graphs in canonical form (internal tensor names do not matter). "
        "Exit 0 when equal, 1 when they differ, 2 on error.",
    )
    parser.add_argument("a", type=Path, help=".onnx model, artifacts folder, or snapshot .json")
    parser.add_argument("b", type=Path, help="the same kind as A")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance for initializer and parameter values")
    parser.add_argument("--ignore", action="append", default=[], help="manifest key (or prefix) to skip; repeatable")
    parser.add_argument("--limit", type=int, default=20, help="lines per kind of difference in text output (0: all)")
    parser.add_argument("--snapshot", type=Path, default=None, help="also write B's canonical snapshot .json here")
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfcompile inspect",
        description="Per-layer table (shapes, trainable/frozen, filtered r, saved activations, backward FLOPs) "
        "and a peak-memory estimate of a compiled artifacts folder, or of what compiling a model would pick.",
    )
    parser.add_argument("path", type=Path, help="artifacts folder, or an uncompiled .onnx model")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--plot", type=Path, default=None, help="bar chart of saved activations per layer (.png)")
    plan = parser.add_argument_group("for an uncompiled model: what `gfcompile MODEL ...` would do")
    plan.add_argument("--filter-layers", type=int, default=None)
    plan.add_argument("--train-layers", type=int, default=None)
    plan.add_argument("--patch-size", type=int, default=None)
    plan.add_argument("--patch-size-map", type=Path, default=None)
    plan.add_argument("--batch-size", type=int, default=None)
    plan.add_argument("--input-shape", type=_shape, default=None)
    plan.add_argument("--bn-mode", choices=("eval", "train", "frozen"), default=None)
    plan.add_argument("--optimizer", choices=("adamw", "sgd"), default=None)
    return parser


def bundle_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfcompile bundle",
        description="Write a self-contained device bundle: models, initial checkpoint, runner, README, "
        "and a manifest with the sha256 of every file.",
    )
    parser.add_argument("artifacts", type=Path, help="folder written by gfcompile")
    parser.add_argument("-o", "--output", type=Path, required=True, help="bundle folder, or NAME.tar.gz")
    parser.add_argument("--ort-format", action="store_true", help="ship training and optimizer models as .ort")
    parser.add_argument(
        "--preprocess",
        default=None,
        help="JSON (or a .json file) with scale, mean, std, layout for uint8 data and images; "
        "replaces what the model recorded",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--sign-key",
        type=Path,
        default=None,
        help="Ed25519 private key (PEM) that signs the bundle's SHA256SUMS; devices check it with gftrain "
        "--trusted-key (make a pair: openssl genpkey -algorithm ed25519 -out KEY && openssl pkey -in KEY -pubout "
        "-out KEY.pub)",
    )
    return parser


def federate_parser() -> argparse.ArgumentParser:
    from . import federate_cli

    parser = argparse.ArgumentParser(
        prog="gfcompile federate",
        description="Federated fine-tuning with Flower: FedAvg/FedProx over the trainable parameters only, "
        "simulated clients with Dirichlet non-IID partitions of the training set.",
    )
    federate_cli.add_arguments(parser)
    return parser


def export_parser() -> argparse.ArgumentParser:
    from . import export

    parser = argparse.ArgumentParser(
        prog="gfcompile export",
        description="Export a PyTorch model (torchvision name, zoo name, or FILE.py:FACTORY) to an ONNX file "
        "that gfcompile compiles as it is: eval mode, BatchNorm kept, state_dict names, dynamic batch.",
    )
    export.add_arguments(parser, _shape)
    return parser


def _export(args: argparse.Namespace) -> int:
    from . import export

    return export.run(args)


def _federate(args: argparse.Namespace) -> int:
    from . import federate_cli

    return federate_cli.run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommand -> (parser, handler); a model path is the default `compile` command.
    commands = {
        "train": (lambda: run_parser("train"), lambda args: _run("train", args)),
        "eval": (lambda: run_parser("eval"), lambda args: _run("eval", args)),
        "diff": (diff_parser, _diff),
        "inspect": (inspect_parser, _inspect),
        "bundle": (bundle_parser, _bundle),
        "compile": (compile_parser, _compile),
        "federate": (federate_parser, _federate),
        "export": (export_parser, _export),
    }
    stop_on_termination()
    try:
        if argv and argv[0] in commands:
            make_parser, handler = commands[argv[0]]
            return handler(make_parser().parse_args(argv[1:]))
        return _compile(compile_parser().parse_args(argv))
    except (GfError, RunError) as exc:
        print(f"gfcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        quiet_teardown()
        print(f"gfcompile: interrupted ({signal_name(stop)}); no partial output was left", file=sys.stderr)
        return exit_code(stop)


def _read_patch_size_map(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        patch_size_map = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GfError(f"{path}: cannot read the patch-size map ({exc})") from None
    if not isinstance(patch_size_map, dict) or not all(isinstance(v, int) for v in patch_size_map.values()):
        raise GfError(f"{path}: expected a JSON object of layer name -> integer patch size")
    return patch_size_map


def _show_pass_log() -> None:
    """Print the passes' log (loggers "gfcompile.passes.*", debug level: skipped matches too) to stderr."""
    import logging

    logger = logging.getLogger("gfcompile.passes")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.handlers = [handler]  # once, however often main() runs in one process
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # a root handler some library installs would print every line twice


def _compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_model

    patch_size_map = _read_patch_size_map(args.patch_size_map)
    config = CompileConfig(
        filter_layers=args.filter_layers,
        train_layers=args.train_layers,
        patch_size=args.patch_size,
        patch_size_map=patch_size_map,
        paper_stride_scaling=args.paper_stride_scaling,
        batch_size=args.batch_size,
        input_shape=args.input_shape,
        bn_mode=args.bn_mode,
        loss=args.loss,
        ignore_index=args.ignore_index,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        row_tiles=args.row_tiles,
        row_strategy=args.row_strategy,
        memory_budget_mb=args.memory_budget,
        row_tile_trainable=args.row_tile_trainable,
        output_dir=args.output,
        force=args.force,
        downconvert=args.downconvert,
        feature_cache=args.feature_cache,
        portable=args.portable,
    )
    config.check()
    if args.verbose:
        _show_pass_log()
    report = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    compile_model(args.model, config, report=report)
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .diff import compare, format_text, snapshot, write_snapshot

    a, b = snapshot(args.a), snapshot(args.b)
    report = compare(a, b, atol=args.atol, ignore=args.ignore)
    if args.snapshot is not None:
        write_snapshot(b, args.snapshot)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_text(report, limit=args.limit))
    return 0 if report.equal else 1


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import format_text, inspect_path, plot

    planning = ("filter_layers", "train_layers", "patch_size", "patch_size_map", "batch_size", "input_shape", "bn_mode")
    given = {name: getattr(args, name) for name in (*planning, "optimizer") if getattr(args, name) is not None}
    config = None
    if given:
        if "patch_size_map" in given:
            given["patch_size_map"] = _read_patch_size_map(given["patch_size_map"])
        config = CompileConfig(**given)
    elif args.path.is_file():
        config = CompileConfig()
    result = inspect_path(args.path, config)
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_text(result))
    if args.plot is not None:
        print(f"plot: {plot(result, args.plot)}", file=sys.stderr)
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from .bundle import make_bundle

    preprocess = None
    if args.preprocess is not None:
        text = args.preprocess
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise GfError(
                    f"--preprocess: neither JSON nor a readable file ({exc.strerror}: {args.preprocess})"
                ) from None
        try:
            preprocess = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GfError(f"--preprocess: not valid JSON ({exc})") from None
    path = make_bundle(
        args.artifacts,
        args.output,
        ort_format=args.ort_format,
        preprocess=preprocess,
        force=args.force,
        sign_key=args.sign_key,
    )
    print(f"wrote {path}")
    return 0


def _run(command: str, args: argparse.Namespace) -> int:
    from runtime import training_run
    from runtime.data import load_data
    from runtime.feature_cache import open_run_trainer
    from runtime.trainer import Trainer

    if command == "eval":
        trainer = Trainer(args.artifacts, checkpoint=args.checkpoint)
        print(_describe(trainer.evaluate(load_data(args.data, trainer.manifest)), args.data))
        return 0
    save = args.save or args.artifacts / "trained_checkpoint"
    start = training_run.start_checkpoint(save, args.checkpoint, resume=args.resume, restart=args.restart)
    trainer = open_run_trainer(args.artifacts, start, args.lr, save, args)
    training_run.check_outputs(trainer, save, args.export)
    skip = args.skip_nonfinite
    data = load_data(args.data, trainer.manifest, allow_nonfinite=skip)
    eval_data = load_data(args.eval_data, trainer.manifest) if args.eval_data else None
    if eval_data is not None:
        print("before:", _describe(trainer.evaluate(eval_data), args.eval_data), file=sys.stderr)
    options = training_run.RunOptions(
        steps=args.steps,
        seed=args.seed,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        skip_nonfinite=skip,
    )
    # --checkpoint SAVE starts a new run from those weights; --resume continues the run that wrote them.
    resumed = args.resume and start is not None and start.resolve() == save.resolve()
    losses = training_run.train(trainer, data, options, save, resumed=resumed)
    finite = [loss for loss in losses if math.isfinite(loss)]
    window = max(1, min(10, len(finite) // 2))
    skipped = f"; skipped {len(losses) - len(finite)} non-finite batches" if len(finite) < len(losses) else ""
    if finite:
        print(
            f"trained {len(losses)} steps: loss {sum(finite[:window]) / window:.4f} (first {window}) -> "
            f"{sum(finite[-window:]) / window:.4f} (last {window}){skipped}"
        )
    else:
        print(f"trained {len(losses)} steps{skipped}")
    if eval_data is not None:
        print("after:", _describe(trainer.evaluate(eval_data), args.eval_data))
    print(f"checkpoint: {save} (step {trainer.step})")
    if args.export:
        worst = training_run.export_checked(trainer, args.export, data)
        print(f"inference model: {args.export} (matches the trained eval model, max |diff| {worst:.2g})")
    return 0


def _describe(result, source: Path) -> str:
    accuracy = f", accuracy {result.accuracy:.1%}" if result.accuracy is not None else ""
    return f"{source}: loss {result.loss:.4f}{accuracy} over {result.samples} samples"


if __name__ == "__main__":
    raise SystemExit(main())
