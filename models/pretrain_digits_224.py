"""A 224² twin of the bundled digits model: the 64² MobileNetV2 adapted to digits 0-4 rendered at 224².

Run from the repository root (after `python -m models.pretrain_digits`, whose model it starts from):

    python -m models.pretrain_digits_224

The paper resizes its small images to 224², where the last layers see 7x7 maps; the bundled
model was pretrained at 64², where they see 2x2 maps. Pretraining from scratch at 224² costs
about 12x the 64² run, too much for a small CPU, so this script starts from the 64² weights
(the net ends in a global average pool, so the same weights run at any size) and trains all of
them for a few epochs on the same digits 0-4 training images, rendered at 224² by
`models.digits.load_digits_images` (bilinear from the 8x8 originals), then re-estimates BN
statistics at 224².

Output: `models/zoo/mobilenetv2_digits_224.onnx`, exported at (1, 1, 224, 224) with a dynamic
batch axis. The fine-tuning data at 224² is not committed (34 MB): `digits_224_task` renders
it from the same stratified split, reproducibly.

Everything is seeded and single-process with a fixed thread count and flushed denormals, like
`models.pretrain_digits`, so a re-run on the same torch build writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from models.digits import DIGITS_PREPROCESS, load_digits_images, preprocess, stratified_split
from models.export import export_onnx
from models.mobilenetv2 import mobilenet_v2
from models.pretrain_digits import (
    FINETUNE_CLASSES,
    PRETRAIN_CLASSES,
    SEED,
    _shift_augment,
    _subset,
    accuracy,
    recalibrate_bn,
)
from models.pretrain_digits import (
    ONNX_PATH as SOURCE_64,
)

ROOT = Path(__file__).resolve().parent
SIZE = 224
ONNX_PATH = ROOT / "zoo" / "mobilenetv2_digits_224.onnx"


def digits_224_task() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 64² task's split (same images, same labels) rendered at 224²: pretrain/finetune x train/test."""
    x, y = load_digits_images(size=SIZE)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction=0.25, seed=SEED)
    return {
        "pretrain_train": _subset(x_tr, y_tr, PRETRAIN_CLASSES),
        "pretrain_test": _subset(x_te, y_te, PRETRAIN_CLASSES),
        "finetune_train": _subset(x_tr, y_tr, FINETUNE_CLASSES),
        "finetune_test": _subset(x_te, y_te, FINETUNE_CLASSES),
    }


def load_64_model() -> nn.Module:
    """The bundled 64² model as a torch module (its initializers are the state_dict, by export's contract)."""
    model = mobilenet_v2(num_classes=10, width_mult=0.5, in_channels=1)
    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(SOURCE_64).graph.initializer
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only BN's num_batches_tracked is not in the graph.
    if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
        raise RuntimeError(f"{SOURCE_64}: state_dict mismatch, missing {missing}, unexpected {unexpected}")
    return model


def adapt(x_train: np.ndarray, y_train: np.ndarray, epochs: int, batch_size: int = 16, lr: float = 5e-4) -> nn.Module:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = load_64_model()
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
            # 3 pixels at 224² is the 64² script's 1-pixel shift, scaled.
            loss = loss_fn(model(_shift_augment(xt[idx], gen, max_shift=3)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(xt):.4f}  ({time.time() - t0:.0f}s)", flush=True)
    recalibrate_bn(model, xt, batch_size=32)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pretrain_digits_224", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(2)  # fixed thread count: float reductions stay reproducible
    torch.set_flush_denormal(True)
    task = digits_224_task()
    x_tr, y_tr = task["pretrain_train"]
    x_te, y_te = task["pretrain_test"]
    before = accuracy(load_64_model(), torch.from_numpy(preprocess(x_te)), torch.from_numpy(y_te))
    print(f"64² weights on 224² digits 0-4: test accuracy {before:.4f}")
    model = adapt(x_tr, y_tr, epochs=args.epochs)
    train_acc = accuracy(model, torch.from_numpy(preprocess(x_tr)), torch.from_numpy(y_tr))
    test_acc = accuracy(model, torch.from_numpy(preprocess(x_te)), torch.from_numpy(y_te))
    print(f"digits 0-4 at 224²: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")
    metadata = {
        "preprocessing": json.dumps(DIGITS_PREPROCESS),
        "num_classes": "10",
        "pretrained_on": f"sklearn digits classes 0-4 at {SIZE}x{SIZE}, from {SOURCE_64.name}",
        "script": "models/pretrain_digits_224.py",
        "architecture": "mobilenet_v2(num_classes=10, width_mult=0.5, in_channels=1)",
        "input_shape": f"N,1,{SIZE},{SIZE}",
        "epochs": str(args.epochs),
        "train_accuracy_0to4": f"{train_acc:.4f}",
        "test_accuracy_0to4": f"{test_acc:.4f}",
        "torch_version": torch.__version__,
    }
    export_onnx(model, ONNX_PATH, input_shape=(1, 1, SIZE, SIZE), metadata=metadata)
    print(f"wrote {ONNX_PATH.relative_to(ROOT.parent)} ({ONNX_PATH.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
