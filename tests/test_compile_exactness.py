"""One compiled training step equals PyTorch autograd for every zoo model (issue 2, item 6)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from gfcompile.config import CompileConfig
from gfcompile.pipeline import compile_model
from runtime.trainer import Trainer
from tests.zoo_helpers import ZOO_CASES, export_case, make_batch, relative_error, torch, torch_reference

BATCH = 2
LR = 0.05


def compile_case(onnx_path: Path, out: Path, train_layers: int) -> Path:
    config = CompileConfig(
        train_layers=train_layers,
        batch_size=BATCH,
        optimizer="sgd",
        momentum=0.0,
        lr=LR,
        output_dir=out,
    )
    return compile_model(onnx_path, config, report=lambda message: None)


@pytest.mark.parametrize("n_layers", [1, 2, 4])
@pytest.mark.parametrize("case_name", list(ZOO_CASES))
def test_training_step_matches_autograd(tmp_path: Path, case_name: str, n_layers: int) -> None:
    case = ZOO_CASES[case_name]
    model, onnx_path = export_case(case, tmp_path)
    artifacts = compile_case(onnx_path, tmp_path / "artifacts", n_layers)
    trainer = Trainer(artifacts)
    plan = trainer.manifest["plan"]
    assert len(plan["trainable_convs"]) == n_layers

    # Every trainable name is a real PyTorch parameter, and the trained convs are the last n.
    named = dict(model.named_parameters())
    assert set(plan["trainable_params"]) <= set(named)
    conv_weights = [name for name, p in named.items() if p.dim() == 4]
    trained_conv_weights = [name for name in plan["trainable_params"] if named[name].dim() == 4]
    assert trained_conv_weights == conv_weights[-n_layers:]

    classes = trainer.manifest["outputs"][0]["shape"][1]
    x, y = make_batch(case, BATCH, classes)
    ref_loss, ref_grads = torch_reference(model, plan["trainable_params"], x, y)

    trainer.module.train()
    loss = float(trainer.module(x, y)[0])
    assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    for name, expected in ref_grads.items():
        actual = trainer.state.parameters[name].grad
        assert actual.shape == expected.shape, name
        assert relative_error(actual, expected) <= 1e-4, name

    # One SGD step: trainable weights move by -lr * grad, everything else (frozen weights,
    # BN running statistics) stays, so the exported inference model equals PyTorch after
    # the same update.
    trainer.optimizer.step()
    trainer.module.lazy_reset_grad()
    with torch.no_grad():
        for name, grad in ref_grads.items():
            named[name] -= LR * torch.from_numpy(grad)
        expected_out = model(torch.from_numpy(x)).numpy()
    exported = trainer.export_inference(tmp_path / "inference.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (actual_out,) = session.run(None, {"input": x})
    assert relative_error(actual_out, expected_out) <= 1e-4


def test_emitted_graphs_pass_checker_and_shape_inference(tmp_path: Path) -> None:
    import onnxruntime as ort

    case = ZOO_CASES["mobilenet_v2"]
    _, onnx_path = export_case(case, tmp_path)
    artifacts = compile_case(onnx_path, tmp_path / "artifacts", 2)
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        model = onnx.load(str(artifacts / name))
        onnx.checker.check_model(model)
        assert model.ir_version <= 10
    eval_model = onnx.load(str(artifacts / "eval_model.onnx"))
    ort.InferenceSession(eval_model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_frozen_prefix_has_no_batchnorm_and_no_gradients(tmp_path: Path) -> None:
    case = ZOO_CASES["resnet18"]
    _, onnx_path = export_case(case, tmp_path)
    artifacts = compile_case(onnx_path, tmp_path / "artifacts", 2)
    training = onnx.load(str(artifacts / "training_model.onnx"))
    ops = [node.op_type for node in training.graph.node]
    # Frozen BN is folded into its conv and trainable BN is an eval-mode affine, so ORT never
    # sees a BatchNormalization node (it would train it with batch statistics).
    assert "BatchNormalization" not in ops and "BatchNormInternal" not in ops
    # Backprop stops at the first trainable conv: two ConvGrads for two trainable convs.
    assert ops.count("ConvGrad") == 2
    trainer = Trainer(artifacts)
    frozen = trainer.manifest["plan"]["frozen_params"]
    assert frozen and all(not trainer.state.parameters[name].requires_grad for name in frozen)
    assert all(trainer.state.parameters[name].requires_grad for name in trainer.manifest["plan"]["trainable_params"])


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_bn_modes_match_autograd(tmp_path: Path, bn_mode: str) -> None:
    case = ZOO_CASES["resnet18"]
    model, onnx_path = export_case(case, tmp_path)
    config = CompileConfig(train_layers=2, batch_size=4, bn_mode=bn_mode, output_dir=tmp_path / "artifacts")
    trainer = Trainer(compile_model(onnx_path, config, report=lambda message: None))
    trainable = trainer.manifest["plan"]["trainable_params"]
    bn_params = [name for name in trainable if ".bn" in name]
    assert bool(bn_params) == (bn_mode == "train")
    x, y = make_batch(case, 4, 10)
    if bn_mode == "train":
        # Batch statistics in the trainable layers only, as ORT trains them.
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d) and f"{name}.weight" in trainable:
                module.train()
                module.momentum = 0.0  # keep running statistics fixed, as the frozen checkpoint does
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainable)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    trainer.module.train()
    assert abs(float(trainer.module(x, y)[0]) - float(loss.detach())) <= 1e-4 * max(1.0, float(loss.detach()))
    for name in trainable:
        assert relative_error(trainer.state.parameters[name].grad, named[name].grad.numpy()) <= 1e-4, name
