"""How tiny_dynamo.onnx was made: torch 2.13's default exporter (dynamo, onnxscript 0.7.2, onnx 1.23),
which the project's environment cannot run (no onnxscript release supports both torch 2.13 and
onnx 1.16.2). Run it in a throwaway environment with those two installed:

    python tests/data/dynamo_tiny/make_tiny_dynamo.py tests/data/dynamo_tiny

It writes the model with external data (IR 10, opset 20; BatchNorm folded into the convs under the
convs' own names) and the PyTorch state_dict the test compares against.
"""

import sys

import numpy as np
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Tiny()
    generator = torch.Generator().manual_seed(1)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.copy_(torch.rand(8, generator=generator) - 0.5)
        bn.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
    model.eval()
    folder = sys.argv[1]
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), f"{folder}/tiny_dynamo.onnx", external_data=True)
    np.savez(f"{folder}/tiny_dynamo_state.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
