"""An MCUNet-style mobile inverted-bottleneck network.

MCUNet (Lin et al., 2020) searches a MobileNetV2-like space where every block
picks its depthwise kernel (3/5/7) and expansion ratio (3/4/6). This is a fixed
hand-written member of that space, not one of the published searched models:

* `features.0`: 3x3 stride-2 conv + BN + ReLU6;
* `features.1`: a depthwise-separable block (expansion 1);
* `features.2..15`: inverted residual blocks with mixed kernels / expansions,
  four of them stride 2 (overall stride 32);
* `features.16`: 1x1 conv + BN + ReLU6;
* global average pool, `classifier` = Dropout + Linear.

Blocks reuse `models.mobilenetv2.InvertedResidual`, so names follow the same
torchvision style (`features.3.conv.1.0.weight` is a depthwise kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from models.mobilenetv2 import ConvBNReLU6, InvertedResidual, _make_divisible, init_weights

__all__ = ["MCUNet", "mcunet", "BLOCKS"]

# kernel, expansion, output channels, stride. Kernels/expansions are mixed the
# way MCUNet's searched models are: large kernels early at high resolution
# where they are cheap in channels, high expansion where the stage changes.
BLOCKS: list[tuple[int, int, int, int]] = [
    (3, 1, 8, 1),
    (7, 3, 16, 2),
    (3, 4, 16, 1),
    (5, 6, 24, 2),
    (5, 3, 24, 1),
    (7, 4, 24, 1),
    (3, 6, 40, 2),
    (7, 3, 40, 1),
    (5, 4, 40, 1),
    (5, 6, 48, 1),
    (3, 4, 48, 1),
    (7, 6, 96, 2),
    (5, 4, 96, 1),
    (3, 3, 96, 1),
    (3, 6, 160, 1),
]


class MCUNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem_channels: int = 16,
        last_channel: int = 320,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c_in = _make_divisible(stem_channels * width_mult)
        features: list[nn.Module] = [ConvBNReLU6(in_channels, c_in, kernel_size=3, stride=2)]
        for k, t, c, s in BLOCKS:
            c_out = _make_divisible(c * width_mult)
            features.append(InvertedResidual(c_in, c_out, s, expand_ratio=t, kernel_size=k))
            c_in = c_out
        # Like MobileNetV2, the head does not shrink below its nominal width.
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult))
        features.append(ConvBNReLU6(c_in, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mcunet(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0) -> MCUNet:
    """Build a randomly initialised MCUNet-style network."""
    return MCUNet(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
