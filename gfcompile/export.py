"""`gfcompile export`: a PyTorch model to an ONNX file that the compiler takes as it is.

    gfcompile export resnet50 -o resnet50.onnx --input-shape 3,224,224 --num-classes 10
    gfcompile export my_net.py:build -o my_net.onnx --weights my_net.pt
    gfcompile export fcn_resnet50 -o fcn.onnx --input-shape 3,128,128 --num-classes 5

MODEL is a torchvision model name (built with weights=None: nothing is downloaded), a zoo name from
`models/` (`zoo:NAME` picks the zoo where both have the name), or `FILE.py:FACTORY`, a function that
returns an `nn.Module`. The recipe is `models.export.export_onnx`: eval mode, BatchNorm kept
(no constant folding), initializers named after the state_dict and never deduplicated, a dynamic
batch axis, and a segmentation net's "out" entry as its one output.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GfError
from .loading import MAX_OPSET, one_line

if TYPE_CHECKING:
    from torch import nn

DEFAULT_INPUT_SHAPE = (3, 224, 224)
DEFAULT_OPSET = 17
# The legacy TorchScript exporter's oldest opset with every op the zoo and torchvision need.
MIN_OPSET = 11
TORCHVISION_PREFIX = "torchvision:"
ZOO_PREFIX = "zoo:"

Reporter = Callable[[str], None]


def add_arguments(parser: argparse.ArgumentParser, shape_type: Callable[[str], tuple[int, ...]]) -> None:
    parser.add_argument(
        "model",
        help="torchvision model name (e.g. resnet50, mobilenet_v3_small, fcn_resnet50), zoo name "
        "(zoo:resnet18), or FILE.py:FACTORY returning an nn.Module",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--input-shape",
        type=shape_type,
        default=DEFAULT_INPUT_SHAPE,
        help="C,H,W of the example input the exporter traces (default 3,224,224); the batch axis stays dynamic",
    )
    parser.add_argument("--num-classes", type=int, default=None, help="passed to the model's constructor")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a local state_dict file (torch.save) to load; without it the weights are random",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def run(args: argparse.Namespace) -> int:
    report = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    export_model(
        args.model,
        args.output,
        input_shape=args.input_shape,
        num_classes=args.num_classes,
        weights=args.weights,
        seed=args.seed,
        opset=args.opset,
        force=args.force,
        report=report,
    )
    return 0


def export_model(
    spec: str,
    output: Path,
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    num_classes: int | None = None,
    weights: Path | None = None,
    seed: int = 0,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    report: Reporter = print,
) -> Path:
    """Build the model `spec` names and export it to `output`; returns the path."""
    output = Path(output)
    shape = _example_shape(input_shape)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise GfError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (onnxruntime-training 1.19 takes <= {MAX_OPSET})")
    if num_classes is not None and num_classes < 1:
        raise GfError(f"--num-classes must be >= 1, got {num_classes}")
    if output.exists() and not force:
        raise GfError(f"{output} exists; pass --force to replace it")
    if output.suffix != ".onnx":
        raise GfError(f"{output}: the output should be a .onnx file")
    if weights is not None and not weights.is_file():
        raise GfError(f"--weights {weights}: no such file")
    torch = _import_torch()
    from models.export import export_onnx

    started = time.monotonic()
    torch.manual_seed(seed)
    label, model = build_model(spec, num_classes, in_channels=shape[1])
    if weights is not None:
        _load_weights(model, weights, torch)
    n_params = sum(p.numel() for p in model.parameters())
    origin = f"weights from {weights}" if weights is not None else f"random weights (seed {seed})"
    report(f"built {label}: {n_params:,} parameters, {origin}")
    report(f"exporting at input {'x'.join(map(str, shape))} (batch axis dynamic), opset {opset} ...")
    try:
        export_onnx(model, output, input_shape=shape, opset=opset, metadata={"source_model": label})
    except Exception as exc:  # the exporter raises many types, all about the model's code
        raise GfError(f"exporting {label} failed: {type(exc).__name__}: {one_line(exc)}") from None
    size_mb = output.stat().st_size / 2**20
    report(f"wrote {output} ({size_mb:.1f} MiB) in {time.monotonic() - started:.1f} s")
    report(f"compile it with: gfcompile {output} --input-shape {','.join(map(str, shape[1:]))} -o artifacts")
    return output


def build_model(spec: str, num_classes: int | None, in_channels: int = 3) -> tuple[str, nn.Module]:
    """(a label saying where the model came from, the model) for a name or FILE.py:FACTORY spec."""
    if spec.startswith(ZOO_PREFIX):
        return _zoo_model(spec[len(ZOO_PREFIX) :], num_classes, in_channels)
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    if ":" in spec or spec.endswith(".py"):
        return _factory_model(spec, num_classes)
    from models import ZOO

    if spec in _torchvision_names():
        return _torchvision_model(spec, num_classes, in_channels)
    if spec in ZOO:
        return _zoo_model(spec, num_classes, in_channels)
    known = [*_torchvision_names(), *ZOO]
    close = difflib.get_close_matches(spec, known, n=3)
    hint = (
        f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() or models/README.md"
    )
    raise GfError(f"unknown model {spec!r}: not a torchvision model, a zoo model, or a FILE.py:FACTORY spec{hint}")


def _torchvision_names() -> list[str]:
    from models.torchvision_models import classification_names, segmentation_names

    try:
        return [*classification_names(), *segmentation_names()]
    except ImportError:
        return []  # torchvision is not installed: names resolve against the zoo only


def _torchvision_model(name: str, num_classes: int | None, in_channels: int) -> tuple[str, nn.Module]:
    try:
        from models.torchvision_models import build_torchvision
    except ImportError:
        raise GfError("torchvision is not installed (pip install 'gfcompile[torch]')") from None
    if in_channels != 3:
        raise GfError(f"torchvision models take 3 input channels; --input-shape asks for {in_channels}")
    if name not in _torchvision_names():
        raise GfError(f"unknown torchvision model {name!r}")
    return f"torchvision {name}", _called(f"torchvision's {name}", lambda: build_torchvision(name, num_classes))


def _zoo_model(name: str, num_classes: int | None, in_channels: int) -> tuple[str, nn.Module]:
    from models import ZOO, build

    if name not in ZOO:
        raise GfError(f"unknown zoo model {name!r}; the zoo has {', '.join(sorted(ZOO))}")
    kwargs: dict[str, Any] = {"in_channels": in_channels}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return f"zoo {name}", _called(f"the zoo's {name}", lambda: build(name, **kwargs))


def _factory_model(spec: str, num_classes: int | None) -> tuple[str, nn.Module]:
    from torch import nn

    file_text, _, factory_name = spec.rpartition(":")
    if not file_text or not factory_name.isidentifier():
        raise GfError(f"model spec {spec!r}: expected FILE.py:FACTORY, e.g. my_net.py:build")
    path = Path(file_text)
    if not path.is_file():
        raise GfError(f"model spec {spec!r}: {path} is not a file")
    module_spec = importlib.util.spec_from_file_location(f"gfcompile_user_model_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise GfError(f"model spec {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's module may raise anything at import
        raise GfError(f"importing {path} raised {type(exc).__name__}: {one_line(exc)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise GfError(f"model spec {spec!r}: {path} defines no function {factory_name!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = _called(f"{factory_name}() from {path}", lambda: factory(**kwargs))
    if not isinstance(model, nn.Module):
        raise GfError(f"{factory_name}() from {path} returned {type(model).__name__}, not a torch.nn.Module")
    return f"{path.name}:{factory_name}", model


def _called(what: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except Exception as exc:  # a factory may raise anything; the user needs its message, not our traceback
        raise GfError(f"{what} raised {type(exc).__name__}: {one_line(exc)}") from None


def _load_weights(model: nn.Module, path: Path, torch) -> None:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of many types
        raise GfError(f"--weights {path}: not a loadable state_dict ({type(exc).__name__}: {one_line(exc)})") from None
    for key in ("state_dict", "model"):  # the usual training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise GfError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise GfError(f"--weights {path} does not match the model: {one_line(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise GfError(
            f"--weights {path} does not match the model: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}"
        )


def _example_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(1, C, H, W) from C,H,W or N,C,H,W; the example's batch size does not matter, the axis is dynamic."""
    if len(input_shape) == 4:
        input_shape = input_shape[1:]
    if len(input_shape) != 3 or any(d < 1 for d in input_shape):
        raise GfError(f"--input-shape must be C,H,W with positive sizes, got {','.join(map(str, input_shape))}")
    return (1, *input_shape)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise GfError("gfcompile export needs PyTorch: pip install 'gfcompile[torch]'") from None
    return torch
