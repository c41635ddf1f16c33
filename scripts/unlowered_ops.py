"""List the training-only ops that the gradient builder emits and that no lower pass handles.

    nice -n 19 .venv/bin/python scripts/unlowered_ops.py                         # zoo + torchvision
    nice -n 19 .venv/bin/python scripts/unlowered_ops.py --models resnet18,googlenet --modes all

Each model (the zoo's at the test sizes, the torchvision coverage matrix's architectures) is compiled
with --no-portable in each mode; the script then counts the non-standard ops of the training graph
(com.microsoft, and ORT's default-domain gradients such as MaxPoolGrad) and runs the `lower` stage
on it, as the compiler does for the portable step, and prints what is left, or the lower pass's
refusal. One JSON line per (model, mode), then a summary of the ops left over.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# mode -> CompileConfig options; "all" and "tiled_all" train every conv (train_layers is filled in per model).
MODES = {
    "last4": {"filter_layers": 0, "train_layers": 4},
    "filtered4": {"filter_layers": 4},
    "tiled4": {"filter_layers": 0, "train_layers": 4, "row_tiles": 4, "row_tile_trainable": True},
    "bn_train4": {"filter_layers": 0, "train_layers": 4, "bn_mode": "train"},
    "all": {"filter_layers": 0},
    "tiled_all": {"filter_layers": 0, "row_tiles": 2, "row_tile_trainable": True},
}


def non_standard(model) -> collections.Counter:
    import onnx

    return collections.Counter(
        f"{node.domain or 'ai.onnx'}::{node.op_type}"
        for node in model.graph.node
        if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type)
    )


def export(name: str, root: Path, size: int | None) -> Path:
    """Export zoo model or torchvision architecture `name` as the tests do."""
    from dataclasses import replace

    from tests.zoo_helpers import ZOO_CASES, export_case

    if name in ZOO_CASES:
        case = ZOO_CASES[name]
        if size is not None:
            case = replace(case, input_shape=(3, size, size))
        return export_case(case, root)[1]
    from tests import test_torchvision_coverage as coverage

    arch = next(a for a in [*coverage.FAST, *coverage.SLOW] if a.name == name)
    if size is not None:
        arch = replace(arch, size=size)
    _, path = coverage.Workbench(root).model(arch)
    return path


def conv_count(path: Path) -> int:
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load(str(path), load_external_data=False).graph.node)


def scan(path: Path, mode: str, root: Path) -> dict:
    import onnx

    from gfcompile.config import CompileConfig
    from gfcompile.passrunner import run_passes
    from gfcompile.pipeline import LOWER_PASSES, compile_model
    from gfcompile.train_step import with_shapes
    from passes.base import Plan

    options = dict(MODES[mode])
    if mode in ("all", "tiled_all"):
        options["train_layers"] = conv_count(path)
    output = root / mode
    config = CompileConfig(**options, batch_size=2, optimizer="sgd", portable=False, output_dir=output)
    try:
        compile_model(path, config, report=lambda message: None)
    except Exception as exc:  # a model this mode cannot compile says so in its row
        return {"compile_error": " ".join(str(exc).split())[:300]}
    training = onnx.load(str(output / "training_model.onnx"))
    row = {"training_only": dict(non_standard(training))}
    try:
        lowered = run_passes(LOWER_PASSES, with_shapes(training), Plan(convs=[]), stage="lower")
        row["unlowered"] = dict(non_standard(lowered))
    except Exception as exc:
        row["lower_error"] = " ".join(str(exc).split())[:300]
    return row


def main(argv: list[str] | None = None) -> int:
    from tests import test_torchvision_coverage as coverage
    from tests.zoo_helpers import ZOO_CASES

    known = list(ZOO_CASES) + [a.name for a in [*coverage.FAST, *coverage.SLOW]]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated (default: all of {len(known)})")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    parser.add_argument("--size", type=int, default=None, help="input H = W (default: each model's test size)")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else known
    unknown = [n for n in names if n not in known] + [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    left: dict[str, set[str]] = collections.defaultdict(set)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"gf-unlowered-{name}-") as tmp:
            root = Path(tmp)
            path = export(name, root, args.size)
            for mode in args.modes.split(","):
                started = time.monotonic()
                row = {"model": name, "mode": mode, **scan(path, mode, root)}
                row["seconds"] = round(time.monotonic() - started, 1)
                print(json.dumps(row), flush=True)
                for op in row.get("unlowered", {}):
                    left[op].add(f"{name}/{mode}")
                if "lower_error" in row:
                    left["(lower pass refused)"].add(f"{name}/{mode}: {row['lower_error']}")
    print("\nunlowered ops:" if left else "\nevery training-only op was lowered", flush=True)
    for op, where in sorted(left.items()):
        print(f"  {op}: {', '.join(sorted(where))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
