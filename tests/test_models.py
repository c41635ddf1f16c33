"""Tests for the model zoo (`models/`): torchvision naming, ONNX export, data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models import ZOO, build  # noqa: E402
from models.digits import (  # noqa: E402
    DIGITS_PREPROCESS,
    load_digits_32,
    load_digits_images,
    preprocess,
    stratified_split,
)
from models.export import export_onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZOO_ONNX = REPO / "models" / "zoo" / "mobilenetv2_digits.onnx"
DATA_DIR = REPO / "models" / "data"

# name -> (constructor kwargs for a small test instance, spatial input size).
# VGG needs 224: its AdaptiveAvgPool2d(7) only exports when the 1/32 feature
# map is a multiple of 7; a narrow classifier keeps it light.
SMALL: dict[str, tuple[dict[str, object], int]] = {
    "mobilenet_v2": ({"num_classes": 10}, 64),
    "resnet18": ({"num_classes": 10}, 64),
    "resnet34": ({"num_classes": 10}, 64),
    "mcunet": ({"num_classes": 10}, 64),
    "mcunet_5fps": ({"num_classes": 10}, 64),
    "deeplabv3_resnet18": ({"num_classes": 5}, 64),
    "vgg16_bn": ({"num_classes": 10, "classifier_width": 64}, 224),
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **kwargs: object) -> torch.nn.Module:
    # Meta tensors: exact shapes and names without allocating (vgg16_bn is 0.5 GB).
    with torch.device("meta"):
        return build(name, **kwargs)


def _calibrate_bn(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Give BN layers data-derived running stats so eval outputs are O(1) and the
    numerical comparison is meaningful (fresh stats make some nets output ~1e-9)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(*shape, generator=torch.Generator().manual_seed(1)))
    model.eval()


def test_registry_names() -> None:
    assert set(ZOO) == {
        "mobilenet_v2",
        "resnet18",
        "resnet34",
        "mcunet",
        "mcunet_5fps",
        "deeplabv3_resnet18",
        "vgg16_bn",
    }
    with pytest.raises(KeyError):
        build("resnet50")


def test_models_package_does_not_import_torch() -> None:
    code = "import sys, models, models.digits; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("mobilenet_v2", 3_504_872),
        ("vgg16_bn", 138_365_992),
        # not in torchvision; analytic: ResNet-18 trunk 11,176,512 + head 4,727,573
        ("deeplabv3_resnet18", 15_904_085),
    ],
)
def test_parameter_counts_match_torchvision(name: str, count: int) -> None:
    assert _params(_meta(name)) == count


def test_mobilenet_v2_names_and_shapes() -> None:
    sd = _meta("mobilenet_v2").state_dict()
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert "features.0.1.running_mean" in sd
    # t=1 block has no expansion conv: conv.0 is the depthwise, conv.1 the projection.
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert sd["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert "features.1.conv.2.running_var" in sd
    assert sd["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert "features.2.conv.3.num_batches_tracked" in sd
    assert sd["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"].shape == (1000, 1280)
    assert "features.19.0.weight" not in sd


def test_mobilenet_v2_width_and_channels() -> None:
    m = _meta("mobilenet_v2", num_classes=10, width_mult=0.5, in_channels=1)
    sd = m.state_dict()
    assert sd["features.0.0.weight"].shape == (16, 1, 3, 3)
    assert sd["features.18.0.weight"].shape == (1280, 160, 1, 1)  # head never narrower than 1280
    assert sd["classifier.1.weight"].shape == (10, 1280)


def test_resnet_names_and_shapes() -> None:
    sd18 = _meta("resnet18").state_dict()
    assert sd18["conv1.weight"].shape == (64, 3, 7, 7)
    assert "bn1.running_mean" in sd18
    assert sd18["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert "layer1.0.downsample.0.weight" not in sd18
    assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer2.0.downsample.1.running_var" in sd18
    assert sd18["fc.weight"].shape == (1000, 512)
    sd34 = _meta("resnet34", num_classes=7, in_channels=1).state_dict()
    assert "layer3.5.conv2.weight" in sd34 and "layer3.6.conv1.weight" not in sd34
    assert sd34["conv1.weight"].shape == (64, 1, 7, 7)
    assert sd34["fc.bias"].shape == (7,)


def test_resnet_dilation_keeps_resolution() -> None:
    m = build("resnet18", replace_stride_with_dilation=[False, True, True]).eval()
    assert m.layer3[0].conv1.dilation == (1, 1) and m.layer3[1].conv1.dilation == (2, 2)
    assert m.layer4[0].conv1.dilation == (2, 2) and m.layer4[1].conv2.dilation == (4, 4)
    with torch.no_grad():
        assert m.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 8, 8)
    plain = build("resnet18")
    assert set(plain.state_dict()) == set(m.state_dict())


def test_vgg16_bn_names_and_shapes() -> None:
    sd = _meta("vgg16_bn").state_dict()
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert "features.1.running_mean" in sd
    assert sd["features.40.weight"].shape == (512, 512, 3, 3)
    assert "features.41.running_var" in sd and "features.44.weight" not in sd
    assert sd["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert sd["classifier.3.weight"].shape == (4096, 4096)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    small = _meta("vgg16_bn", num_classes=10, classifier_width=64).state_dict()
    assert small["classifier.0.weight"].shape == (64, 25088)


def test_mcunet_structure() -> None:
    from models.mcunet import BLOCKS

    m = _meta("mcunet", num_classes=10)
    sd = m.state_dict()
    assert sd["features.0.0.weight"].shape == (16, 3, 3, 3)
    assert sd["features.0.0.weight"].shape[2:] == (3, 3) and m.features[0][0].stride == (2, 2)
    assert "features.1.conv.0.0.weight" in sd  # depthwise-separable first block
    dw_kernels = {m.features[i + 1].conv[-3][0].kernel_size[0] for i in range(len(BLOCKS))}
    assert dw_kernels == {3, 5, 7}
    assert {t for _, t, _, _ in BLOCKS} - {1} == {3, 4, 6}
    assert sum(s == 2 for *_, s in BLOCKS) == 4
    last = len(BLOCKS) + 1
    assert sd[f"features.{last}.0.weight"].shape[2:] == (1, 1)
    assert sd["classifier.1.weight"].shape == (10, 320)
    # regression guard for the fixed configuration (not a published model)
    assert _params(_meta("mcunet")) == 850_832


def test_deeplab_names_shapes_and_output() -> None:
    m = build("deeplabv3_resnet18", num_classes=5).eval()
    sd = m.state_dict()
    for key in [
        "backbone.conv1.weight",
        "backbone.layer4.1.bn2.running_mean",
        "classifier.0.convs.0.0.weight",
        "classifier.0.convs.3.1.running_var",
        "classifier.0.convs.4.1.weight",
        "classifier.0.project.0.weight",
        "classifier.4.bias",
    ]:
        assert key in sd, key
    assert not any(k.startswith(("backbone.fc", "backbone.avgpool")) for k in sd)
    assert sd["classifier.0.convs.1.0.weight"].shape == (256, 512, 3, 3)
    assert [m.classifier[0].convs[i][0].dilation for i in (1, 2, 3)] == [(12, 12), (24, 24), (36, 36)]
    assert sd["classifier.0.project.0.weight"].shape == (256, 5 * 256, 1, 1)
    assert sd["classifier.4.weight"].shape == (5, 256, 1, 1)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, 5, 48, 40)
    # The ORT-trainable upsampling (Expand + MatMul) equals torchvision's F.interpolate.
    ref = build("deeplabv3_resnet18", num_classes=5, upsample="resize").eval()
    ref.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ONNX export


def _check_exported(path: Path, model: torch.nn.Module) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 10
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    # Initializers are exactly the state_dict minus the BN step counters, which
    # eval-mode BN does not use: nothing folded, deduplicated or renamed.
    inits = {t.name for t in proto.graph.initializer}
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert inits == expected
    assert any(n.endswith("running_mean") for n in inits)
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    return proto


@pytest.mark.parametrize("name", sorted(SMALL))
def test_export_fresh_model_keeps_bn_names(name: str, tmp_path: Path) -> None:
    # A fresh BN has running_mean == bias == 0 and running_var == weight == 1;
    # the exporter's initializer deduplication would merge them if not disabled.
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = build(name, **kwargs)
    path = export_onnx(model, tmp_path / f"{name}.onnx", input_shape=(1, 3, size, size))
    _check_exported(path, model)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_export_matches_pytorch_with_dynamic_batch(name: str, tmp_path: Path) -> None:
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = build(name, **kwargs)
    _calibrate_bn(model, (4, 3, size, size))
    path = export_onnx(model, tmp_path / f"{name}.onnx", input_shape=(1, 3, size, size))
    assert not model.training
    _check_exported(path, model)

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    assert out.shape == ref.shape and out.shape[0] == 2
    assert np.abs(ref).max() > 1e-3, "degenerate reference output"
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_export_metadata_and_static_batch(tmp_path: Path) -> None:
    model = build("mcunet", num_classes=3, in_channels=1, width_mult=0.5)
    meta = {"pretrained_on": "nothing", "preprocessing": json.dumps(DIGITS_PREPROCESS)}
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(2, 1, 32, 32), metadata=meta, dynamic_batch=False)
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props} == meta
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 1, 32, 32]


def test_export_cli(tmp_path: Path) -> None:
    from models.export import main

    out = tmp_path / "cli.onnx"
    rc = main(["mcunet", "-o", str(out), "--input-size", "32", "--num-classes", "4", "--width-mult", "0.5"])
    assert rc == 0
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]


# ---------------------------------------------------------------- digits data


def test_load_digits_32() -> None:
    x, y = load_digits_32()
    assert x.shape == (1797, 1, 32, 32) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.min() == 0 and y.max() == 9
    assert x.max() == 255 and x.min() == 0
    x2, y2 = load_digits_32(classes=[7, 2])
    assert set(np.unique(y2)) == {2, 7} and len(x2) == len(y2) == int(np.isin(y, [2, 7]).sum())
    with pytest.raises(ValueError):
        load_digits_32(classes=[10])


def test_preprocess_constants_match_data() -> None:
    x, _ = load_digits_32()
    f = x / 255.0
    assert DIGITS_PREPROCESS["mean"][0] == pytest.approx(f.mean(), abs=1e-4)
    assert DIGITS_PREPROCESS["std"][0] == pytest.approx(f.std(), abs=1e-4)
    z = preprocess(x[:8])
    assert z.dtype == np.float32 and z.shape == (8, 1, 32, 32)


def test_stratified_split_is_deterministic_and_stratified() -> None:
    x, y = load_digits_32(classes=[0, 1, 2])
    a = stratified_split(x, y, test_fraction=0.25, seed=3)
    b = stratified_split(x, y, test_fraction=0.25, seed=3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    x_tr, y_tr, x_te, y_te = a
    assert len(y_tr) + len(y_te) == len(y)
    for c in (0, 1, 2):
        assert (y_te == c).sum() == round(0.25 * (y == c).sum())
    c = stratified_split(x, y, test_fraction=0.25, seed=4)
    assert not np.array_equal(c[3], y_te) or not np.array_equal(c[2], x_te)


# ---------------------------------------------------------------- bundled artefacts


def _load_npz(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_DIR / name) as d:
        return d["x"], d["y"]


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("digits_5to9_train.npz", {5, 6, 7, 8, 9}),
        ("digits_5to9_test.npz", {5, 6, 7, 8, 9}),
        ("digits_0to4_test.npz", {0, 1, 2, 3, 4}),
    ],
)
def test_bundled_data(name: str, labels: set[int]) -> None:
    path = DATA_DIR / name
    assert path.stat().st_size < 1_500_000
    x, y = _load_npz(name)
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (1, 64, 64)
    assert y.dtype == np.int64 and set(np.unique(y)) == labels and len(x) == len(y)


def test_bundled_data_is_reproducible() -> None:
    # Every bundled file, images and labels, must be exactly what models/pretrain_digits.py derives.
    x, y = load_digits_images(size=64)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction=0.25, seed=0)
    expected = {
        "digits_0to4_test.npz": (x_te[y_te < 5], y_te[y_te < 5]),
        "digits_5to9_train.npz": (x_tr[y_tr >= 5], y_tr[y_tr >= 5]),
        "digits_5to9_test.npz": (x_te[y_te >= 5], y_te[y_te >= 5]),
    }
    assert sorted(path.name for path in DATA_DIR.glob("digits_*.npz")) == sorted(expected)
    for name, (images, labels) in expected.items():
        bundled_images, bundled_labels = _load_npz(name)
        assert len(labels) > 0, name
        assert bundled_images.dtype == images.dtype and bundled_labels.dtype == labels.dtype, name
        np.testing.assert_array_equal(bundled_images, images, err_msg=name)
        np.testing.assert_array_equal(bundled_labels, labels, err_msg=name)


def test_bundled_mobilenetv2_digits() -> None:
    assert ZOO_ONNX.exists()
    assert ZOO_ONNX.stat().st_size < 5 * 1024 * 1024
    proto = onnx.load(str(ZOO_ONNX))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["pretrained_on"] == "sklearn digits classes 0-4"
    assert meta["num_classes"] == "10"
    spec = json.loads(meta["preprocessing"])
    assert spec["layout"] == "NCHW" and spec["dtype"] == "uint8"

    x, y = _load_npz("digits_0to4_test.npz")
    sess = ort.InferenceSession(str(ZOO_ONNX), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: preprocess(x, spec)})
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(axis=1) == y).mean())
    assert acc > 0.8, f"accuracy {acc:.3f}"
