"""A small real image data set: scikit-learn's bundled handwritten digits at 32x32.

`sklearn.datasets.load_digits()` ships with scikit-learn (no download): 1797
greyscale 8x8 images with intensities 0..16, labels 0..9. We upscale them to
32x32 with bilinear interpolation so they pass through CNN stems with stride
32 without collapsing, and store them the way a device would receive camera
data: uint8 0..255, NCHW, plus the preprocessing to apply
(`(x * scale - mean) / std`).

Deliberately numpy + scikit-learn only (no torch at import time): the
compiler and runtime tests load these arrays without a PyTorch install.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "DIGITS_PREPROCESS",
    "IMAGE_SIZE",
    "load_digits_32",
    "preprocess",
    "resize_bilinear",
    "stratified_split",
]

IMAGE_SIZE = 32  # load_digits_32; the bundled demo uses 64 (models.pretrain_digits --size)

# Mean / std of x/255 over all 1797 images and all 32x32 pixels of
# load_digits_32() (every class), computed once in float64 with
#   x = load_digits_32()[0] / 255.0; x.mean(), x.std()
# and hard-coded so preprocessing does not depend on which split is loaded.
# test_models.py re-computes them to guard against drift.
DIGITS_PREPROCESS: dict[str, object] = {
    "scale": 1.0 / 255.0,
    "mean": [0.30523],
    "std": [0.32364],
    "layout": "NCHW",
    "dtype": "uint8",
}


def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """1-D bilinear interpolation matrix, half-pixel centres, borders clamped.

    Same convention as torch's F.interpolate(mode="bilinear",
    align_corners=False) and ONNX Resize(linear, half_pixel).
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a stack of square images (N, H, W) to (N, size, size), float64."""
    n, h, w = images.shape
    a_h = _interp_matrix(size, h)
    a_w = _interp_matrix(size, w)
    # Separable: rows then columns, as one batched matmul each.
    return a_h @ images.astype(np.float64) @ a_w.T


def load_digits_32(classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`load_digits_images` at 32x32."""
    return load_digits_images(classes, size=32)


def load_digits_images(classes: Sequence[int] | None = None, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y): x uint8 (N, 1, size, size) in 0..255, y int64 original labels.

    `classes` keeps only those labels (original values, not re-indexed), in
    the data set's original order.
    """
    from sklearn.datasets import load_digits  # imported lazily: sklearn import is slow

    ds = load_digits()
    images = np.asarray(ds.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    labels = np.asarray(ds.target, dtype=np.int64)
    if classes is not None:
        wanted = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted > 9)]
        if bad.size:
            raise ValueError(f"digit classes must be in 0..9, got {bad.tolist()}")
        keep = np.isin(labels, wanted)
        images, labels = images[keep], labels[keep]
    big = resize_bilinear(images, size) * (255.0 / 16.0)
    x = np.clip(np.rint(big), 0, 255).astype(np.uint8)[:, None, :, :]
    return x, labels


def stratified_split(
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic per-class split: returns (x_train, y_train, x_test, y_test).

    Each class contributes round(test_fraction * count) samples to the test
    set, chosen by a seeded numpy permutation. Written out rather than using
    sklearn's train_test_split so the result cannot change with library
    versions. Indices keep the original order within each part.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        n_test = int(round(test_fraction * len(idx)))
        test_mask[rng.permutation(idx)[:n_test]] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


def preprocess(x: np.ndarray, spec: dict[str, object] | None = None) -> np.ndarray:
    """uint8 NCHW -> float32 network input, `(x * scale - mean) / std` per channel."""
    spec = DIGITS_PREPROCESS if spec is None else spec
    scale = float(spec["scale"])  # type: ignore[arg-type]
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) * np.float32(scale) - mean) / std).astype(np.float32)
