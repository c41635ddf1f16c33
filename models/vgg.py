"""VGG-16 with batch norm, torchvision's structure and state_dict names.

Mirrors `torchvision.models.vgg16_bn` (`features.N` for conv/bn/relu/pool,
`classifier.0/3/6` for the linears; 138,365,992 parameters at 1000 classes).
`classifier_width` shrinks the two hidden 4096-wide linears for benchmarks
where only the convolutional trunk matters; the default keeps torchvision's.

Note on input sizes: the trunk downsamples by 32 and is followed by
AdaptiveAvgPool2d(7x7). The legacy ONNX exporter only handles adaptive pooling
when the feature map is a multiple of 7 (e.g. 224 or 448 inputs), so export at
those sizes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg16_bn"]

# torchvision's configuration "D": numbers are conv widths, "M" is a 2x2 max pool.
_CFG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _make_features(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        classifier_width: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, classifier_width),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(classifier_width, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, classifier_width: int = 4096) -> VGG:
    """Build a randomly initialised VGG-16-BN (torchvision-compatible names)."""
    return VGG(_make_features(_CFG_D, in_channels), num_classes=num_classes, classifier_width=classifier_width)
