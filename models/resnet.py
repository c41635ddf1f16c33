"""ResNet-18/34 with torchvision's layer structure and state_dict names.

Mirrors `torchvision.models.resnet18/34` (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, `fc`; 11,689,512 / 21,797,672 parameters at 1000
classes) with two additions:

* `in_channels` for the stem conv;
* dilation in `BasicBlock`. torchvision raises NotImplementedError for
  `replace_stride_with_dilation` on BasicBlock networks, but the DeepLabV3
  ResNet-18 backbone needs output stride 8. Here a dilated BasicBlock dilates
  both 3x3 convs (padding = dilation, as in dilated residual networks). This
  changes no parameter shape or name, only the conv attributes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        replace_stride_with_dilation: list[bool] | None = None,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 entries, got {replace_stride_with_dilation}")

        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            # Trade the stride for dilation: resolution is kept, receptive field still grows.
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        # Like torchvision, the first block of a dilated stage still uses the
        # previous stage's dilation; the rest use the new one.
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + layer1..layer4 (what DeepLab uses as its backbone)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    replace_stride_with_dilation: list[bool] | None = None,
) -> ResNet:
    """Build a randomly initialised ResNet-18 (torchvision-compatible names)."""
    return ResNet([2, 2, 2, 2], num_classes, in_channels, replace_stride_with_dilation=replace_stride_with_dilation)


def resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    replace_stride_with_dilation: list[bool] | None = None,
) -> ResNet:
    """Build a randomly initialised ResNet-34 (torchvision-compatible names)."""
    return ResNet([3, 4, 6, 3], num_classes, in_channels, replace_stride_with_dilation=replace_stride_with_dilation)
