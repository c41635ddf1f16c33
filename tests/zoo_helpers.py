"""Shared test helpers: small zoo models exported to ONNX, and PyTorch autograd references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

torch = __import__("pytest").importorskip("torch")

from models import build  # noqa: E402
from models.export import export_onnx  # noqa: E402


@dataclass(frozen=True)
class ZooCase:
    name: str
    kwargs: dict
    input_shape: tuple[int, int, int]  # C, H, W
    segmentation: bool = False


# Small widths and inputs keep the suite fast; structure and parameter names are the zoo's.
ZOO_CASES = {
    "mobilenet_v2": ZooCase("mobilenet_v2", {"num_classes": 10, "width_mult": 0.35}, (3, 32, 32)),
    "resnet18": ZooCase("resnet18", {"num_classes": 10}, (3, 32, 32)),
    "resnet34": ZooCase("resnet34", {"num_classes": 10}, (3, 32, 32)),
    "mcunet": ZooCase("mcunet", {"num_classes": 10, "width_mult": 0.5}, (3, 48, 48)),
    "deeplabv3_resnet18": ZooCase("deeplabv3_resnet18", {"num_classes": 5}, (3, 33, 33), segmentation=True),
}


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Non-trivial running statistics, so eval-mode BN is not an identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.75)
            module.weight.data.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.75)
            module.bias.data.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)


def export_case(case: ZooCase, directory: Path, seed: int = 0):
    """Build the zoo model with fixed weights, export it, and return (torch model, onnx path)."""
    torch.manual_seed(seed)
    model = build(case.name, **case.kwargs)
    randomize_batchnorm(model, seed)
    model.eval()
    path = export_onnx(model, directory / f"{case.name}.onnx", input_shape=(1, *case.input_shape))
    return model, path


def make_batch(case: ZooCase, batch: int, classes: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *case.input_shape)).astype(np.float32)
    if case.segmentation:
        y = rng.integers(0, classes, size=(batch, *case.input_shape[1:])).astype(np.int64)
    else:
        y = rng.integers(0, classes, size=batch).astype(np.int64)
    return x, y


def torch_reference(model, trainable: list[str], x: np.ndarray, y: np.ndarray, ignore_index: int = 255):
    """Loss and gradients by PyTorch autograd: eval mode, only `trainable` requires grad."""
    model.eval()
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainable)
        parameter.grad = None
    logits = model(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), ignore_index=ignore_index)
    loss.backward()
    return float(loss.detach()), {name: named[name].grad.detach().numpy().copy() for name in trainable}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(actual - expected).max()) / scale
