"""Pretrain the bundled MobileNetV2 on digits 0-4 and write the fine-tuning data.

Run from the repository root:

    python -m models.pretrain_digits

Outputs (all committed, all small):

* `models/zoo/mobilenetv2_digits.onnx`: mobilenet_v2(num_classes=10,
  width_mult=0.5, in_channels=1) trained on digits 0-4, exported at
  (1, 1, 64, 64) with a dynamic batch axis and the preprocessing in its
  metadata. The head has 10 outputs so that fine-tuning on 5-9 reuses it.
* `models/data/digits_5to9_{train,test}.npz`: the fine-tuning task, keys
  `x` (uint8, N x 1 x 64 x 64) and `y` (int64, original labels 5..9).
* `models/data/digits_0to4_test.npz`: held-out images of the pretraining
  classes, for checking forgetting.

The split is one deterministic stratified 75/25 split of all 1797 images
(`models.digits.stratified_split`, seed 0); both tasks are carved out of it.
Everything is seeded and runs single-process on CPU with a fixed thread count,
so re-running reproduces the same weights on the same torch build.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.digits import DIGITS_PREPROCESS, load_digits_images, preprocess, stratified_split
from models.export import export_onnx
from models.mobilenetv2 import mobilenet_v2

ROOT = Path(__file__).resolve().parent
ONNX_PATH = ROOT / "zoo" / "mobilenetv2_digits.onnx"
DATA_DIR = ROOT / "data"
PRETRAIN_CLASSES = [0, 1, 2, 3, 4]
FINETUNE_CLASSES = [5, 6, 7, 8, 9]
SEED = 0
ARCHITECTURE = "mobilenet_v2(num_classes=10, width_mult=0.5, in_channels=1)"


def _subset(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, classes)
    return x[keep], y[keep]


def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels, filled with the background level.

    The digits are centred, so a small shift is a cheap augmentation that helps
    a from-scratch net on ~700 images (larger shifts slowed convergence).
    """
    n, _, h, w = x.shape
    pad = nn.functional.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Replace BN running statistics by exact averages over the clean training set.

    Running averages collected during training lag behind the weights and see
    augmented batches of 16; on this small set re-estimating them once at the
    end raised held-out eval-mode accuracy by a few points.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = plain mean over batches
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size])
    for bn in bns:
        bn.momentum = 0.1  # back to the PyTorch default for later fine-tuning
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = model(x).argmax(dim=1)
    return float((pred == y).float().mean())


def digits_mobilenet() -> nn.Module:
    """A fresh, randomly initialised ARCHITECTURE."""
    return mobilenet_v2(num_classes=10, width_mult=0.5, in_channels=1)


def make_deterministic() -> None:
    """Single-process CPU settings under which a re-run writes the same weights on the same torch build."""
    torch.set_num_threads(2)  # fixed thread count: float reductions stay reproducible
    # Tiny activations/gradients of a fresh net can become denormal floats, which
    # are very slow on x86; a profile of an early version had AdamW's sqrt()
    # dominating the step time. Flushing them to zero costs no accuracy here.
    torch.set_flush_denormal(True)


def pretrain_accuracies(
    model: nn.Module, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], label: str
) -> tuple[float, float]:
    """Eval-mode accuracy on the digits 0-4 training and test images, printed."""
    train_acc, test_acc = (
        accuracy(model, torch.from_numpy(preprocess(x)), torch.from_numpy(y)) for x, y in (train, test)
    )
    print(f"{label}: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")
    return train_acc, test_acc


def digits_metadata(
    pretrained_on: str, script: str, size: int, accuracies: tuple[float, float], **extra: str
) -> dict[str, str]:
    """The exported model's metadata; `extra` entries go after the input shape (their order is in the bytes)."""
    train_acc, test_acc = accuracies
    return {
        "preprocessing": json.dumps(DIGITS_PREPROCESS),
        "num_classes": "10",
        "pretrained_on": pretrained_on,
        "script": script,
        "architecture": ARCHITECTURE,
        "input_shape": f"N,1,{size},{size}",
        **extra,
        "train_accuracy_0to4": f"{train_acc:.4f}",
        "test_accuracy_0to4": f"{test_acc:.4f}",
        "torch_version": torch.__version__,
    }


def fit(
    build_model: Callable[[], nn.Module],
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_shift: int,
    bn_batch_size: int,
) -> nn.Module:
    """Seed, build the model, train it with AdamW and a one-cycle LR on shifted images, re-estimate BN.

    The bundled weights are reproducible byte for byte only while the random draws keep their
    order: the global seed is set before `build_model` (its initialisation and, later, Dropout
    draw from the global generator); batch order and shifts draw from their own generator.
    """
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = build_model()
    xt = torch.from_numpy(preprocess(x_train))
    yt = torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm in train mode needs more than one sample
                continue
            xb = _shift_augment(xt[idx], gen, max_shift=max_shift)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(xt):.4f}  ({time.time() - t0:.0f}s)", flush=True)
    recalibrate_bn(model, xt, batch_size=bn_batch_size)
    return model.eval()


def train(
    x_train: np.ndarray,
    y_train: np.ndarray,
    epochs: int,
    batch_size: int = 16,
    lr: float = 2e-3,
) -> nn.Module:
    """The bundled 64² model, from scratch."""
    return fit(
        digits_mobilenet,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_shift=1,
        bn_batch_size=64,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pretrain_digits", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    # 64x64 leaves 2x2 maps at the last layers, so gradient filtering with r = 2 has patches to average.
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)

    t0 = time.time()
    make_deterministic()
    x, y = load_digits_images(size=args.size)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction=0.25, seed=SEED)
    x_tr04, y_tr04 = _subset(x_tr, y_tr, PRETRAIN_CLASSES)
    x_te04, y_te04 = _subset(x_te, y_te, PRETRAIN_CLASSES)
    x_tr59, y_tr59 = _subset(x_tr, y_tr, FINETUNE_CLASSES)
    x_te59, y_te59 = _subset(x_te, y_te, FINETUNE_CLASSES)
    print(f"pretrain 0-4: {len(y_tr04)} train / {len(y_te04)} test; finetune 5-9: {len(y_tr59)} / {len(y_te59)}")

    model = train(x_tr04, y_tr04, epochs=args.epochs)
    accuracies = pretrain_accuracies(model, (x_tr04, y_tr04), (x_te04, y_te04), "digits 0-4")
    metadata = digits_metadata("sklearn digits classes 0-4", "models/pretrain_digits.py", args.size, accuracies)
    export_onnx(model, ONNX_PATH, input_shape=(1, 1, args.size, args.size), metadata=metadata)

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DATA_DIR / "digits_5to9_train.npz", x=x_tr59, y=y_tr59)
    np.savez_compressed(DATA_DIR / "digits_5to9_test.npz", x=x_te59, y=y_te59)
    np.savez_compressed(DATA_DIR / "digits_0to4_test.npz", x=x_te04, y=y_te04)
    for p in [ONNX_PATH, *sorted(DATA_DIR.glob("digits_*.npz"))]:
        print(f"wrote {p.relative_to(ROOT.parent)} ({p.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
