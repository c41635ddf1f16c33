"""MCUNet's published `mcunet-5fps` ImageNet model, the network of the gradient-filtering paper's Table 2.

The architecture is the ProxylessNAS config `mcunet/assets/configs/mcunet-5fps_imagenet.json`
of the MIT HAN lab's `tinyml` repository, transcribed into `BLOCKS` below:

* `features.0`: 3x3 stride-2 conv 3 -> 16 + BN + ReLU6;
* `features.1..14`: mobile inverted residual blocks (1x1 expand -> kxk depthwise -> 1x1
  linear projection, BN after each conv, ReLU6 after the first two). A block with
  expansion 1 has no expand conv. The identity shortcut is present exactly where the
  config lists an `IdentityLayer` shortcut;
* no feature-mix conv: global average pool of the 160 channels, then `classifier`
  (Dropout with the config's rate 0, then Linear 160 -> classes).

The config's native resolution is 96; the paper (and our analytic suite) feeds it 224²,
where the last blocks see 7x7 maps. Blocks reuse `models.mobilenetv2.InvertedResidual`,
so parameter names follow torchvision's MobileNetV2 (`features.14.conv.1.0.weight` is the
last block's depthwise kernel). 636,232 parameters at 1000 classes, 42 convs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.mobilenetv2 import ConvBNReLU6, InvertedResidual, init_weights

__all__ = ["BLOCKS", "MCUNet5fps", "MBBlock", "STEM_CHANNELS", "mcunet_5fps"]


class MBBlock(NamedTuple):
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand_ratio: int
    shortcut: bool  # the config's IdentityLayer shortcut


STEM_CHANNELS = 16

# The config's `blocks`, in order.
BLOCKS: tuple[MBBlock, ...] = (
    MBBlock(16, 8, 3, 1, 1, False),
    MBBlock(8, 16, 3, 2, 4, False),
    MBBlock(16, 16, 3, 1, 3, True),
    MBBlock(16, 24, 7, 2, 3, False),
    MBBlock(24, 24, 3, 1, 5, True),
    MBBlock(24, 40, 3, 2, 5, False),
    MBBlock(40, 40, 7, 1, 4, True),
    MBBlock(40, 48, 5, 1, 4, False),
    MBBlock(48, 48, 3, 1, 3, True),
    MBBlock(48, 48, 3, 1, 4, True),
    MBBlock(48, 96, 7, 2, 5, False),
    MBBlock(96, 96, 5, 1, 4, True),
    MBBlock(96, 96, 5, 1, 4, True),
    MBBlock(96, 160, 3, 1, 6, False),
)


class MCUNet5fps(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(in_channels, STEM_CHANNELS, kernel_size=3, stride=2)]
        c_in = STEM_CHANNELS
        for block in BLOCKS:
            if block.in_channels != c_in:
                raise AssertionError(f"block table is not a chain: {block} after {c_in} channels")
            layer = InvertedResidual(c_in, block.out_channels, block.stride, block.expand_ratio, block.kernel)
            # InvertedResidual adds the shortcut wherever shapes allow; the config must agree.
            if layer.use_res_connect != block.shortcut:
                raise AssertionError(f"shortcut rule disagrees with the config at {block}")
            features.append(layer)
            c_in = block.out_channels
        self.features = nn.Sequential(*features)
        self.last_channel = c_in
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(c_in, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mcunet_5fps(num_classes: int = 1000, in_channels: int = 3) -> MCUNet5fps:
    """Build a randomly initialised mcunet-5fps (the published architecture, not its weights)."""
    return MCUNet5fps(num_classes=num_classes, in_channels=in_channels)
