"""The planner (issue 13): parameters reached through views, patch sizes fitted to small maps,
the "last N" explanation on branched nets, and the report of untrained initializers."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.errors import GfError
from gfcompile.loading import pin_shapes
from gfcompile.passrunner import run_passes
from gfcompile.pipeline import LEGALIZE_PASSES, describe_plan
from gfcompile.planning import explain_selection, select_layers, untrained_initializers

torch = pytest.importorskip("torch")
nn = torch.nn

from models.export import export_onnx  # noqa: E402


def planned(module: nn.Module, tmp_path: Path, input_shape, **config):
    path = export_onnx(module, tmp_path / "model.onnx", input_shape=input_shape)
    model = run_passes(LEGALIZE_PASSES, onnx.load(str(path)), None, stage="legalize", history=[])
    compile_config = CompileConfig(batch_size=input_shape[0], **config)
    model = pin_shapes(model, compile_config)
    return model, select_layers(model, compile_config)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's pattern: a Linear on NHWC (MatMul through a Transpose of the weight, bias by Add),
    a layer scale multiplied in, and a normalising constant subtracted."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4, 4)
        self.layer_scale = nn.Parameter(torch.full((4,), 0.5))
        self.register_buffer("offset", torch.linspace(0, 1, 4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = (self.layer_scale * self.linear(y) - self.offset).permute(0, 3, 1, 2)
        return self.head(y).mean((2, 3))


def test_weights_reached_through_views_and_affine_operands_train(tmp_path: Path) -> None:
    module = ChannelsLastBlock()
    model, plan = planned(module, tmp_path, (2, 3, 6, 6), train_layers=2)
    expected = {name for name, _ in module.named_parameters()}
    assert set(plan.trainable_params) == expected
    # Which MatMul input the weight reaches through its Transpose is the exporter's business; that
    # it does is what makes this test meaningful.
    producers = {out: node for node in model.graph.node for out in node.output}
    matmul = next(node for node in model.graph.node if node.op_type == "MatMul")
    assert any(producers.get(name) is not None and producers[name].op_type == "Transpose" for name in matmul.input)
    # The buffer is neither a parameter nor layer state: it is reported, not silently frozen.
    assert untrained_initializers(model, plan) == ["offset"]


def test_untrained_report_is_empty_when_everything_is_accounted_for(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten())
    model, plan = planned(module.eval(), tmp_path, (2, 3, 4, 4), train_layers=1)
    assert untrained_initializers(model, plan) == []
    assert {"1.running_mean", "1.running_var"} <= set(plan.frozen_params)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.small = nn.Conv2d(8, 8, 1)  # on a 2x2 map
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = self.small(self.pool2(y * gate))
        return self.head(y).mean((2, 3))


def conv_names(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "Conv"]


def test_patch_size_fits_small_maps(tmp_path: Path) -> None:
    model, plan = planned(SqueezeExcite(), tmp_path, (2, 3, 8, 8), filter_layers=5, patch_size=4)
    conv, fc1, fc2, small, head = conv_names(model)
    assert plan.filtered == {conv: 4, small: 2, head: 2}
    assert plan.fitted_patch_sizes == {fc1: 1, fc2: 1, small: 2, head: 2}
    assert set(plan.trainable_convs) == {conv, fc1, fc2, small, head}  # r=1: trained exactly
    line = describe_plan(plan)
    assert f"{fc1}: output smaller than the patch size, exact backward (r=1)" in line
    assert f"{small}: output smaller than the patch size, r=2, the largest that fits" in line
    reasons = {choice.conv: (choice.status, choice.reason) for choice in explain_selection(model, plan)}
    assert reasons[fc2][0] == "trained (exact)" and "so r=1: exact backward" in reasons[fc2][1]
    assert reasons[small][0] == "filtered (r=2)"


def test_explicit_patch_size_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    path = export_onnx(SqueezeExcite(), tmp_path / "model.onnx", input_shape=(2, 3, 8, 8))
    fc1 = conv_names(onnx.load(str(path)))[1]
    with pytest.raises(GfError, match=r"patch size 2 \(set for this layer in --patch-size-map\) is larger"):
        planned(SqueezeExcite(), tmp_path, (2, 3, 8, 8), filter_layers=5, patch_size_map={fc1: 2})


class TwoBranches(nn.Module):
    """An inception-like block: "last 2" in graph order takes one branch and leaves the other."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(4, 2, 3, padding=1)
        self.right2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.left(x), self.right2(self.right(x))], 1).mean((2, 3))


def test_explain_selection_names_the_frozen_parallel_branch(tmp_path: Path) -> None:
    model, plan = planned(TwoBranches(), tmp_path, (2, 3, 5, 5), train_layers=2)
    stem, left, right, right2 = conv_names(model)
    assert plan.trainable_convs == [right, right2]
    choices = {choice.conv: choice for choice in explain_selection(model, plan)}
    statuses = [choices[name].status for name in (stem, left, right, right2)]
    assert statuses == ["frozen", "frozen", "trained (exact)", "trained (exact)"]
    assert "parallel" in choices[left].reason and "parallel" not in choices[stem].reason
    concat = next(node.name for node in model.graph.node if node.op_type == "Concat")
    assert repr(concat) in choices[left].reason
