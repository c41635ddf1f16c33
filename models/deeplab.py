"""DeepLabV3 with a ResNet-18 backbone, torchvision-style structure and names.

Follows `torchvision.models.segmentation.deeplabv3_resnet50` with the backbone
swapped for ResNet-18 (512 output channels) at output stride 8
(`replace_stride_with_dilation=[False, True, True]`, see `models.resnet` for
how BasicBlock is dilated), no auxiliary head:

* `backbone.*`: ResNet-18 stem and layer1..layer4 (no avgpool / fc), the names
  torchvision's IntermediateLayerGetter produces (`backbone.conv1.weight`,
  `backbone.layer4.1.bn2.running_mean`, ...);
* `classifier.0`: ASPP with a 1x1 branch, three 3x3 atrous branches at rates
  (12, 24, 36), and a global-average-pool branch (`classifier.0.convs.0..4`),
  concatenated and projected (`classifier.0.project.0/1`, Dropout 0.5);
* `classifier.1/2/3`: 3x3 conv + BN + ReLU; `classifier.4`: 1x1 conv to classes;
* bilinear upsampling (align_corners=False) of the logits to the input size.

Deviation from torchvision (default `upsample="matmul"`): onnxruntime-training
1.19.2 *builds* a gradient for ONNX `Resize` (ResizeGrad) but has no CPU kernel
for it, so a model whose graph contains Resize cannot run a training step on
CPU ("Could not find an implementation for ResizeGrad(1)"). Both bilinear
upsamples are therefore written with ops that do have CPU gradients, computing
the same function:

* ASPP pooling branch: the pooled map is 1x1, and bilinear upsampling of a 1x1
  map is a broadcast, so it is exported as `Expand` (exact).
* Final upsample: bilinear interpolation with align_corners=False is separable
  and linear, `out = A_h @ x @ A_w^T`, with constant interpolation matrices
  built from PyTorch's half-pixel rule (border clamping included). It exports
  as two `MatMul` with constant operands and matches `F.interpolate` to float
  rounding. The matrices depend on the spatial size, so an exported graph has
  a fixed H x W (the batch axis can still be dynamic).

`upsample="resize"` restores torchvision's literal `F.interpolate` calls (ONNX
Resize), for inference-only comparisons. Parameter names are identical.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.resnet import ResNet, resnet18

__all__ = ["ASPP", "DeepLabHead", "DeepLabV3", "bilinear_matrix", "deeplabv3_resnet18"]

Upsample = Literal["matmul", "resize"]


@lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D bilinear interpolation, align_corners=False.

    Same rule as PyTorch's `upsample_bilinear2d` when an output size is given:
    src = (dst + 0.5) * in/out - 0.5, clamped at 0, right neighbour clamped at
    in-1. Rows sum to 1.
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    # np.add.at accumulates when i0 == i1 at the right border.
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    m.setflags(write=False)
    return m


def _bilinear_matmul(x: torch.Tensor, out_h: int | torch.Tensor, out_w: int | torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # Under ONNX export tracing, turning sizes into ints and numpy arrays into
        # tensors makes the matrices graph constants. That is intended (H x W are
        # fixed per export), so the TracerWarnings about it are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
        a_h = torch.from_numpy(bilinear_matrix(int(out_h), in_h).astype(np.float32)).to(x.device)
        a_wt = torch.from_numpy(bilinear_matrix(int(out_w), in_w).T.astype(np.float32)).to(x.device)
    # (H, h) @ (N, C, h, w) @ (w, W): MatMul broadcasts over N and C.
    return torch.matmul(torch.matmul(a_h, x), a_wt)


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, upsample: Upsample = "matmul") -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        if self.upsample == "resize":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        # Bilinear upsampling of a 1x1 map is a broadcast; Expand has a CPU gradient.
        # Spelling out every dim (no -1) keeps the exported shape computation to
        # Shape/Gather/Concat instead of the exporter's -1 handling (Equal/Where).
        return x.expand(x.shape[0], x.shape[1], size[0], size[1])


class ASPP(nn.Module):
    def __init__(
        self,
        in_channels: int,
        atrous_rates: tuple[int, ...],
        out_channels: int = 256,
        upsample: Upsample = "matmul",
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())
        ]
        for rate in atrous_rates:
            modules.append(ASPPConv(in_channels, out_channels, rate))
        modules.append(ASPPPooling(in_channels, out_channels, upsample))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        atrous_rates: tuple[int, ...] = (12, 24, 36),
        upsample: Upsample = "matmul",
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, upsample=upsample),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class ResNetBackbone(nn.Module):
    """ResNet stem + layer1..layer4 under torchvision's IntermediateLayerGetter names."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DeepLabV3(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module, upsample: Upsample = "matmul") -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (N, num_classes, H, W) at the input resolution.

        Returns the tensor itself rather than torchvision's {"out": ...} dict,
        so the exported graph has a single plain output.
        """
        h, w = x.shape[-2:]
        x = self.classifier(self.backbone(x))
        if self.upsample == "resize":
            return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return _bilinear_matmul(x, h, w)


def deeplabv3_resnet18(num_classes: int = 21, in_channels: int = 3, upsample: Upsample = "matmul") -> DeepLabV3:
    """Build a randomly initialised DeepLabV3-ResNet-18 (output stride 8)."""
    if upsample not in ("matmul", "resize"):
        raise ValueError(f"upsample must be 'matmul' or 'resize', got {upsample!r}")
    backbone = ResNetBackbone(resnet18(in_channels=in_channels, replace_stride_with_dilation=[False, True, True]))
    return DeepLabV3(backbone, DeepLabHead(512, num_classes, upsample=upsample), upsample=upsample)
