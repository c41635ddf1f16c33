"""MobileNetV2 with torchvision's layer structure and state_dict names.

torchvision is not installable in this environment, so this is a from-scratch
definition that mirrors `torchvision.models.mobilenet_v2` exactly: same module
tree (`features.N.conv.M...`, `classifier.1`), same channel rounding, same
initialisation. Parameter count at 1000 classes / width 1.0 is 3,504,872.

The only additions are `in_channels` (greyscale inputs) and a `kernel_size`
argument on `InvertedResidual` (default 3, so MobileNetV2 is unchanged), which
`models.mcunet` reuses for its 5x5 / 7x7 blocks.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "_make_divisible", "mobilenet_v2"]


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `v` to the nearest multiple of `divisor` (torchvision's rule).

    Never goes below `min_value` and never rounds down by more than 10 %, so
    narrow width multipliers do not silently lose a large share of channels.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU6, torchvision's Conv2dNormActivation.

    Being an `nn.Sequential` keeps the child names `0` (conv), `1` (bn), `2` (act)
    that torchvision checkpoints use.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> linear project (1x1), with skip when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, kernel_size: int = 3) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden_dim = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # No expansion layer for t=1: torchvision omits it, which shifts the
            # indices of the following layers (features.1.conv.0 is the depthwise).
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU6(hidden_dim, hidden_dim, kernel_size=kernel_size, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation (kaiming fan_out convs, N(0, 0.01) linears)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.2,
        round_nearest: int = 8,
    ) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        # The last conv never shrinks below 1280 (torchvision keeps the head wide
        # for width < 1 because it is cheap at 7x7 and helps accuracy).
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvBNReLU6(in_channels, input_channel, stride=2)]
        for t, c, n, s in _SETTINGS:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # Adaptive pooling to 1x1 exports as GlobalAveragePool, so any input size works.
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    in_channels: int = 3,
    dropout: float = 0.2,
) -> MobileNetV2:
    """Build a randomly initialised MobileNetV2 (torchvision-compatible names)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, dropout=dropout)
