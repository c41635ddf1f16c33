"""Export zoo models to ONNX for the gfcompile pipeline.

Why the exporter is driven the way it is:

* Legacy TorchScript exporter (`dynamo=False`): it maps PyTorch modules to
  plain ONNX ops and names initializers after the state_dict, which the
  compiler uses to match layers and parameters.
* `do_constant_folding=False`: folding would fuse BatchNorm into the preceding
  conv and drop the BN parameters; the training compiler needs them.
* `keep_initializers_as_inputs=True` during export, then stripped again: when
  it is False the exporter deduplicates initializers with identical contents.
  A freshly initialised BN has weight == running_var == 1 and
  bias == running_mean == 0, so `bn.running_mean` silently disappears and is
  replaced by an Identity of `bn.bias`. Exporting with initializers as inputs
  disables that pass; removing them from `graph.input` afterwards gives the
  usual "initializers are constants" model.
* A model that returns a dict (torchvision's segmentation nets: {"out": ..., "aux": ...}) is
  exported with its "out" entry as the one output; parameter names stay the model's own.

Usage: `python -m models.export NAME -o out.onnx [--input-size 224] [--num-classes 10] [--in-channels 3]
[--width-mult 1.0] [--classifier-width 4096] [--batch 1] [--static-batch]`
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

__all__ = ["export_onnx", "main", "prediction_module"]

# The entry of a dict output that is the prediction (torchvision's segmentation models).
DICT_OUTPUT_KEY = "out"


class _DictEntry(nn.Module):
    """`model` returning only `model(x)[key]`. It holds the model's own submodules, parameters and
    buffers (not the model as a child), so the state_dict keys, and the exported names, are unchanged."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        object.__setattr__(self, "_model_forward", model.forward)
        self.key = key
        # An exporter restores the mode of the module it was given, recursively: that must be the model's
        # own mode, or exporting this view would leave the shared BatchNorms in training mode.
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model_forward(x)[self.key]


def prediction_module(model: nn.Module, dummy: torch.Tensor) -> nn.Module:
    """`model` itself, or for a model returning a dict, a view of it returning the dict's "out" entry."""
    with torch.no_grad():
        probe = model(dummy)
    if not isinstance(probe, dict):
        return model
    if DICT_OUTPUT_KEY not in probe:
        raise RuntimeError(f"the model returns a dict without an {DICT_OUTPUT_KEY!r} entry (keys: {sorted(probe)})")
    return _DictEntry(model, DICT_OUTPUT_KEY)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
    metadata: dict[str, str] | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export `model` (in eval mode) to `path` and return the path.

    Initializer names equal the model's state_dict keys (checked). With
    `dynamic_batch` the batch axis of input and output is symbolic ("batch");
    pass False when a static graph is needed (e.g. ORT training artifacts).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    # A private generator keeps the caller's global RNG stream untouched.
    dummy = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    try:
        exported = prediction_module(model, dummy)
        with warnings.catch_warnings():
            # The legacy exporter is deprecated but is exactly what we want here.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                exported,
                (dummy,),
                str(path),
                dynamo=False,
                export_params=True,
                opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=False,
                keep_initializers_as_inputs=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes=dynamic_axes,
            )
    finally:
        model.train(was_training)

    proto = onnx.load(str(path))
    init_names = {t.name for t in proto.graph.initializer}
    kept_inputs = [i for i in proto.graph.input if i.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept_inputs)

    # Every initializer must be a state_dict entry, otherwise the compiler
    # could not map it back to a layer. (Unused entries such as
    # num_batches_tracked are legitimately absent from the graph.)
    state_keys = set(model.state_dict().keys())
    foreign = sorted(init_names - state_keys)
    if foreign:
        raise RuntimeError(f"exported initializers not in the state_dict: {foreign[:10]}")

    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = str(value)

    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from models import ZOO, build

    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--width-mult", type=float, default=None, help="mobilenet_v2 / mcunet only")
    parser.add_argument("--classifier-width", type=int, default=None, help="vgg16_bn only (default 4096)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--static-batch", action="store_true", help="do not mark the batch axis dynamic")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--seed", type=int, default=0, help="seed for the random initialisation")
    args = parser.parse_args(argv)

    kwargs: dict[str, object] = {"in_channels": args.in_channels}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.width_mult is not None:
        kwargs["width_mult"] = args.width_mult
    if args.classifier_width is not None:
        kwargs["classifier_width"] = args.classifier_width
    torch.manual_seed(args.seed)
    model = build(args.name, **kwargs)
    shape = (args.batch, args.in_channels, args.input_size, args.input_size)
    out = export_onnx(
        model,
        args.output,
        input_shape=shape,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        metadata={"zoo_name": args.name, "init": f"random, torch.manual_seed({args.seed})"},
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({args.name}, {n_params:,} parameters, input {list(shape)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
