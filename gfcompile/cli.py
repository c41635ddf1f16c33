"""The `gfcompile` command: compile (the default), train and eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import RunError

from .config import DEFAULT_TRAIN_LAYERS, CompileConfig
from .errors import GfError

SUBCOMMANDS = ("compile", "train", "eval")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,224,224, got {text!r}") from None


def compile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfcompile",
        description="Compile an ONNX CNN into onnxruntime-training artifacts for on-device fine-tuning.",
        epilog="Other commands: gfcompile train ARTIFACTS --data D.npz, gfcompile eval ARTIFACTS --data D.npz",
    )
    parser.add_argument("model", type=Path, help="the .onnx model to compile")
    parser.add_argument("-o", "--output", type=Path, default=Path("artifacts"), help="artifacts folder to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
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
    parser.add_argument("--data", type=Path, required=True, help=".npz file with arrays x and y")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to start from")
    if command == "train":
        parser.add_argument("--steps", type=int, default=50)
        parser.add_argument("--lr", type=float, default=None, help="override the compiled learning rate")
        parser.add_argument("--eval-data", type=Path, default=None, help="evaluate on this .npz before and after")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--save", type=Path, default=None, help="where to write the trained checkpoint")
        parser.add_argument("--export", type=Path, default=None, help="write an inference .onnx after training")
        parser.add_argument("--log-every", type=int, default=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("train", "eval"):
            return _run(argv[0], run_parser(argv[0]).parse_args(argv[1:]))
        if argv and argv[0] == "compile":
            argv = argv[1:]
        return _compile(compile_parser().parse_args(argv))
    except (GfError, RunError) as exc:
        print(f"gfcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gfcompile: interrupted; no partial output was left", file=sys.stderr)
        return 130


def _compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_model

    patch_size_map = {}
    if args.patch_size_map is not None:
        try:
            patch_size_map = json.loads(args.patch_size_map.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GfError(f"{args.patch_size_map}: cannot read the patch-size map ({exc})") from None
        if not isinstance(patch_size_map, dict) or not all(isinstance(v, int) for v in patch_size_map.values()):
            raise GfError(f"{args.patch_size_map}: expected a JSON object of layer name -> integer patch size")
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
        output_dir=args.output,
        force=args.force,
    )
    report = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    compile_model(args.model, config, report=report)
    return 0


def _run(command: str, args: argparse.Namespace) -> int:
    from runtime.data import load_npz
    from runtime.trainer import Trainer

    trainer = Trainer(args.artifacts, checkpoint=args.checkpoint, lr=getattr(args, "lr", None))
    data = load_npz(args.data, trainer.manifest)
    if command == "eval":
        print(_describe(trainer.evaluate(data), args.data))
        return 0
    eval_data = load_npz(args.eval_data, trainer.manifest) if args.eval_data else None
    if eval_data is not None:
        print("before:", _describe(trainer.evaluate(eval_data), args.eval_data), file=sys.stderr)
    if args.steps < 1:
        raise RunError(f"--steps must be >= 1, got {args.steps}")
    losses = trainer.fit(data, steps=args.steps, seed=args.seed, log_every=args.log_every)
    window = max(1, min(10, len(losses) // 2))
    print(
        f"trained {len(losses)} steps: loss {sum(losses[:window]) / window:.4f} (first {window}) -> "
        f"{sum(losses[-window:]) / window:.4f} (last {window})"
    )
    if eval_data is not None:
        print("after:", _describe(trainer.evaluate(eval_data), args.eval_data))
    save = args.save or args.artifacts / "trained_checkpoint"
    trainer.save(save)
    print(f"checkpoint: {save}")
    if args.export:
        trainer.export_inference(args.export)
        print(f"inference model: {args.export}")
    return 0


def _describe(result, source: Path) -> str:
    accuracy = f", accuracy {result.accuracy:.1%}" if result.accuracy is not None else ""
    return f"{source}: loss {result.loss:.4f}{accuracy} over {result.samples} samples"


if __name__ == "__main__":
    raise SystemExit(main())
