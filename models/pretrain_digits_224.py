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
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from models.digits import load_digits_images, preprocess, stratified_split
from models.export import export_onnx
from models.pretrain_digits import (
    FINETUNE_CLASSES,
    PRETRAIN_CLASSES,
    SEED,
    _subset,
    accuracy,
    digits_metadata,
    digits_mobilenet,
    fit,
    make_deterministic,
    pretrain_accuracies,
)
from models.pretrain_digits import (
    ONNX_PATH as SOURCE_64,
)

ROOT = Path(__file__).resolve().parent
SIZE = 224
ONNX_PATH = ROOT / "zoo" / "mobilenetv2_digits_224.onnx"


def digits_224_task(size: int = SIZE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 64² task's split (same images, same labels) rendered at `size`²: pretrain/finetune x train/test."""
    x, y = load_digits_images(size=size)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, test_fraction=0.25, seed=SEED)
    return {
        "pretrain_train": _subset(x_tr, y_tr, PRETRAIN_CLASSES),
        "pretrain_test": _subset(x_te, y_te, PRETRAIN_CLASSES),
        "finetune_train": _subset(x_tr, y_tr, FINETUNE_CLASSES),
        "finetune_test": _subset(x_te, y_te, FINETUNE_CLASSES),
    }


def load_digits_model(source: Path = SOURCE_64) -> nn.Module:
    """A zoo digits model (the bundled 64² one by default) as a torch module (its initializers are the
    state_dict, by export's contract)."""
    model = digits_mobilenet()
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(source).graph.initializer}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only BN's num_batches_tracked is not in the graph.
    if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
        raise RuntimeError(f"{source}: state_dict mismatch, missing {missing}, unexpected {unexpected}")
    return model


def adapt(x_train: np.ndarray, y_train: np.ndarray, epochs: int, batch_size: int = 16, lr: float = 5e-4) -> nn.Module:
    """The 64² weights trained on for a few epochs at 224²."""
    return fit(
        load_digits_model,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_shift=3,  # 3 pixels at 224² is the 64² script's 1-pixel shift, scaled
        bn_batch_size=32,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pretrain_digits_224", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    t0 = time.time()
    make_deterministic()
    task = digits_224_task()
    x_tr, y_tr = task["pretrain_train"]
    x_te, y_te = task["pretrain_test"]
    before = accuracy(load_digits_model(), torch.from_numpy(preprocess(x_te)), torch.from_numpy(y_te))
    print(f"64² weights on 224² digits 0-4: test accuracy {before:.4f}")
    model = adapt(x_tr, y_tr, epochs=args.epochs)
    accuracies = pretrain_accuracies(model, (x_tr, y_tr), (x_te, y_te), "digits 0-4 at 224²")
    metadata = digits_metadata(
        f"sklearn digits classes 0-4 at {SIZE}x{SIZE}, from {SOURCE_64.name}",
        "models/pretrain_digits_224.py",
        SIZE,
        accuracies,
        epochs=str(args.epochs),
    )
    export_onnx(model, ONNX_PATH, input_shape=(1, 1, SIZE, SIZE), metadata=metadata)
    print(f"wrote {ONNX_PATH.relative_to(ROOT.parent)} ({ONNX_PATH.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
